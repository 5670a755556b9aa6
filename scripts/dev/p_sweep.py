"""Development run (issue 21): how far the default InvDiff pushes as the data's bias changes.

    OMP_NUM_THREADS=2 python scripts/dev/p_sweep.py OUT_DIR SEEDS P ...
    e.g. python scripts/dev/p_sweep.py /tmp/p_sweep 0 0.6 0.7 0.8 0.9 0.95

For each p, the demo's base and InvDiff rows (every default, strength 1) on colored digits with
2 colours, with the shipped base trained at that p (scripts/make_assets.py). The question is
the one issue 21 asks: does the output's majority share land near balance (0.5 +- 0.15 per
prompt) at every p, or does one fixed config under-push at high p and flip past balance at low p?
Writes OUT_DIR/p_sweep.json with the per-digit majority shares.
"""
import json
import os
import sys

import torch

ROOT = __file__.rsplit("/scripts/", 1)[0]
sys.path.insert(0, ROOT)

import invdiff.demo as demo  # noqa: E402

out, seeds, ps = sys.argv[1], [int(s) for s in sys.argv[2].split(",")], [float(p) for p in sys.argv[3:]]
torch.set_num_threads(2)
rows = {}
for p in ps:
    key = f"colors2_p{p:g}"
    demo.SETTINGS[key] = demo.Setting(key, f"colored digits, 2 colours, p = {p:g}", False, f"base_p{p:g}", "color", p, 2,
                                      "base_balanced")
    report = demo.run_demo(os.path.join(out, key), seeds=seeds, settings_keys=[key], rows=["base", "invdiff"],
                           progress=False)
    models = report["settings"][0]["models"]
    rows[key] = {row: {"bias": models[row]["bias"], "majority_share": models[row].get("majority_share")}
                 for row in ("base", "invdiff")}
    print(key, {row: round(v["bias"], 3) for row, v in rows[key].items()}, flush=True)
    with open(os.path.join(out, "p_sweep.json"), "w") as f:
        json.dump({"seeds": seeds, "rows": rows}, f, indent=1)
