"""The short table gpu_check.sh prints last: the fused ops against their goals.

Goals on an H100/H200, in bf16 and fp32:
  invariant loss, full forward + backward (issue 3): >= 80% of the measured copy bandwidth,
  >= 3x reference-eager, >= 1.3x torch.compile;
  guided step (issue 4): >= 80% of copy bandwidth and >= 4x the eager chain.
"""
from __future__ import annotations

import json
import sys

GOALS = {"pct_copy": 80.0, "vs_eager": 3.0, "vs_compile": 1.3}
STEP_GOALS = {"pct_copy": 80.0, "vs_eager": 4.0}


def main(paths) -> int:
    lines = []
    missed = 0
    for path in paths:
        with open(path) as f:
            data = json.load(f)
        for row in data["rows"]:
            step = row["op"].startswith("guided_step")
            if row["provider"] != ("fused" if step else "triton") or "ms" not in row:
                continue
            verdicts = []
            graded = step or (row["op"] == "invariant_loss" and row["mode"] == "full")
            goals = STEP_GOALS if step else GOALS
            for key in GOALS:
                goal = goals.get(key)
                if goal is None:
                    verdicts.append("-")
                    continue
                value = row.get(key)
                mark = ""
                if graded:
                    ok = value is not None and value >= goal
                    missed += not ok
                    mark = " ok" if ok else " MISS"
                verdicts.append(f"{value:.3g}{mark}" if value is not None else "-")
            lines.append((row["op"], row["mode"], row["dtype"], row["shape"], f"{row['ms'] * 1e3:.1f}", *verdicts))
        device = data.get("device", "?")
    header = ("op", "mode", "dtype", "shape", "us", "% copy BW", "x eager", "x compile")
    widths = [max(len(h), *(len(r[i]) for r in lines)) if lines else len(h) for i, h in enumerate(header)]
    print(f"\n== invdiff on {device}: goals: invariant_loss/full >=80% copy BW, >=3x eager, >=1.3x compile; "
          "guided_step >=80% copy BW, >=4x eager chain ==")
    print("  ".join(h.ljust(w) for h, w in zip(header, widths)))
    for r in lines:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)))
    print(f"goal checks missed: {missed}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
