"""Development run (issue 21, design setting only): InvDiff's Bias with another max-step cut.

    python scripts/dev/design_cut_bias.py otsu OUT_DIR [SEED ...]

Runs the demo's base and InvDiff rows on the design setting (colored digits, 2 colours, p = 0.9) with every
default but `max_step`, so that its cells compare with the committed matrix's gap-cut cells
(docs/demo_matrix) seed by seed. The demo caches cells by their settings, so a rerun reuses them.
"""
import dataclasses
import sys

import torch

sys.path.insert(0, __file__.rsplit("/scripts/", 1)[0])

import invdiff.demo as demo  # noqa: E402

method, out, seeds = sys.argv[1], sys.argv[2], [int(s) for s in sys.argv[3:]] or [0, 1, 2]
torch.set_num_threads(2)
plain = demo.demo_settings


def with_cut(quick=False, full=False):
    s = plain(quick, full)
    s["invdiff"] = dataclasses.replace(s["invdiff"], max_step=method)
    return s


demo.demo_settings = with_cut
demo.run_demo(out, seeds=seeds, settings_keys=["colors2_p0.9"], rows=["base", "invdiff"], progress=False)
