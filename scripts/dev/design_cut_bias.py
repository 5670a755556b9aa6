"""Development run (issue 21, design setting only): InvDiff's Bias with other max-step settings.

    python scripts/dev/design_cut_bias.py OUT_DIR SEEDS FIELD=VALUE ...
    e.g. python scripts/dev/design_cut_bias.py /tmp/design_otsu 0,1,2 max_step=otsu
         python scripts/dev/design_cut_bias.py /tmp/design_otsu_alt 0 max_step=otsu alternations=2

Runs the demo's base and InvDiff rows on the design setting (colored digits, 2 colours, p = 0.9)
with every DebiasConfig default but the fields given, so that its cells compare with the
committed matrix's cells (docs/demo_matrix_previous_defaults) seed by seed. The demo caches cells by their
settings, so a rerun reuses them.
"""
import dataclasses
import sys

import torch

sys.path.insert(0, __file__.rsplit("/scripts/", 1)[0])

import invdiff.demo as demo  # noqa: E402

out, seeds = sys.argv[1], [int(s) for s in sys.argv[2].split(",")]
fields = {}
for pair in sys.argv[3:]:
    key, value = pair.split("=", 1)
    default = getattr(demo.DebiasConfig(), key)
    if isinstance(default, bool):
        fields[key] = {"true": True, "false": False}[value.lower()]
    else:
        fields[key] = type(default)(value) if default is not None else value
torch.set_num_threads(2)
plain = demo.demo_settings


def with_fields(quick=False, full=False):
    s = plain(quick, full)
    s["invdiff"] = dataclasses.replace(s["invdiff"], **fields)
    return s


demo.demo_settings = with_fields
demo.run_demo(out, seeds=seeds, settings_keys=["colors2_p0.9"], rows=["base", "invdiff"], progress=False)
