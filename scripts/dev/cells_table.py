"""Print the demo cells of a development run, one line per (setting, seed, row).

    python scripts/dev/cells_table.py OUT_DIR [OUT_DIR ...]

Bias, Frechet distance, digit accuracy, the balanced minority share and minority recall of the
inferred groups (evaluation only), and what the label-free calibration chose (separation and
the range of the per-prompt gains), from OUT_DIR[/*]/cells/*.json.
"""
import glob
import json
import os
import sys

for out in sys.argv[1:]:
    for path in sorted(glob.glob(os.path.join(out, "cells", "*.json")) + glob.glob(os.path.join(out, "*", "cells", "*.json"))):
        cell = json.load(open(path))
        r, extra = cell["result"], cell.get("extra", {})
        cal = extra.get("calibration") or {}
        gains = sorted((cal.get("gains") or {}).values())
        line = (f"{os.path.basename(path).rsplit('_', 1)[0]:32s} bias {r['bias']:.3f} fd {r['frechet_distance']:.0f} "
                f"acc {r['digit_accuracy']:.3f}")
        if "balanced_minority_share" in extra:
            line += f" share {extra['balanced_minority_share']:.3f} recall {extra.get('minority_recall', float('nan')):.3f}"
        if cal:
            line += f" separation {cal.get('separation') or float('nan'):.1f} " + (
                f"gains {gains[0]:.2f}-{gains[-1]:.2f}" if gains else f"gain {cal['default_gain']:.2f}")
        print(line)
