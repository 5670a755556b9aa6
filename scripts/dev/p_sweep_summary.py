"""Summarise a p sweep (scripts/dev/p_sweep.py OUT ...): the issue-21 criterion per p.

    python scripts/dev/p_sweep_summary.py OUT_DIR > table.md

Reads OUT_DIR/colors2_p*/report.json and the cached cells (the calibration each InvDiff run
chose) and prints one markdown row per p: Bias, Frechet distance, mean majority share, how many
prompts land in 0.5 +- 0.15, how many flipped below 0.35 or stayed above 0.65, and the
calibration's mode and gains. Writes OUT_DIR/summary.json with the same numbers.
"""
import glob
import json
import os
import sys

out = sys.argv[1]
rows = []
for report_path in sorted(glob.glob(os.path.join(out, "colors2_p*", "report.json"))):
    key = os.path.basename(os.path.dirname(report_path))
    models = json.load(open(report_path))["settings"][0]["models"]
    calibration = None
    for cell_path in glob.glob(os.path.join(os.path.dirname(report_path), "cells", "*.json")):
        cell = json.load(open(cell_path))
        if "calibration" in cell.get("extra", {}):
            calibration = cell["extra"]["calibration"]
    shares = models["invdiff"]["majority_share"]
    row = {"setting": key, "base_bias": models["base"]["bias"], "invdiff_bias": models["invdiff"]["bias"],
           "base_frechet": models["base"]["frechet_distance"], "invdiff_frechet": models["invdiff"]["frechet_distance"],
           "base_majority": sum(models["base"]["majority_share"]) / 10, "invdiff_majority": sum(shares) / 10,
           "in_band": sum(0.35 <= s <= 0.65 for s in shares), "below": sum(s < 0.35 for s in shares),
           "above": sum(s > 0.65 for s in shares), "shares": shares, "calibration": calibration}
    rows.append(row)
print("| p | base Bias | InvDiff Bias | Frechet base / InvDiff | InvDiff mean majority share | prompts in 0.5 ± 0.15 | below 0.35 | above 0.65 | calibration |")
print("|---|---|---|---|---|---|---|---|---|")
for r in rows:
    cal = r["calibration"] or {}
    if cal.get("gains"):
        gains = sorted(cal["gains"].values())
        what = f"separation {cal.get('separation', float('nan')):.1f}; per prompt, gains {gains[0]:.2f}-{gains[-1]:.2f} (median {cal['default_gain']:.2f})"
    else:
        what = f"{cal.get('mode', 'off')} (separation {cal.get('separation') or float('nan'):.1f}): gain 1"
    print(f"| {r['setting'].split('_p')[1]} | {r['base_bias']:.3f} | {r['invdiff_bias']:.3f} | {r['base_frechet']:.0f} / "
          f"{r['invdiff_frechet']:.0f} ({r['invdiff_frechet'] / r['base_frechet']:.2f}x) | {r['invdiff_majority']:.3f} | "
          f"{r['in_band']}/10 | {r['below']} | {r['above']} | {what} |")
json.dump(rows, open(os.path.join(out, "summary.json"), "w"), indent=1)
