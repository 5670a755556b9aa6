"""The tables of docs/results.md, from a demo report (report.json), so that every number there
comes from the committed report and this command:

    python scripts/matrix_tables.py docs/demo_matrix/report.json > docs/demo_matrix/tables.md

Table 1: per setting, base -> InvDiff with the ratios and margins the issue-21 targets are
judged on (means over seeds at strength 1). Table 2: every row's Bias (seed std, Frechet).
A row that was not run on a setting is shown as "not run".
"""
from __future__ import annotations

import json
import sys

ROW_NAMES = {
    "base": "base", "erm": "ERM", "oracle": "oracle (true groups)", "invdiff": "**InvDiff**",
    "official": "official recipe", "jtt": "JTT", "groupdro": "GroupDRO", "balanced": "balanced data",
}


def short_name(setting: dict) -> str:
    return ("design: " if setting["design"] else "held out: ") + setting["name"]


def targets_table(report: dict) -> str:
    lines = ["| setting | Bias base -> InvDiff (ratio; target <= 0.5) | InvDiff Bias seed std (<= 0.05) | "
             "Frechet base -> InvDiff (ratio; <= 1.15) | digit acc base -> InvDiff (points; >= -2) | "
             "balanced minority share (>= 0.5) | minority recall (>= 0.5) | oracle Bias | ERM Bias |",
             "|---|---|---|---|---|---|---|---|---|"]
    for s in report["settings"]:
        m = s["models"]
        b, i = m["base"], m["invdiff"]
        oracle = f"{m['oracle']['bias']:.3f}" if "oracle" in m else "not run"
        erm = f"{m['erm']['bias']:.3f}" if "erm" in m else "not run"
        lines.append(
            f"| {short_name(s)} | {b['bias']:.3f} -> {i['bias']:.3f} ({i['bias'] / b['bias']:.2f}) | "
            f"{i['bias_seed_std']:.3f} | {b['frechet_distance']:.0f} -> {i['frechet_distance']:.0f} "
            f"({i['frechet_distance'] / b['frechet_distance']:.2f}) | {b['digit_accuracy']:.3f} -> "
            f"{i['digit_accuracy']:.3f} ({100 * (i['digit_accuracy'] - b['digit_accuracy']):+.1f}) | "
            f"{i['balanced_minority_share']:.3f} | {i['minority_recall']:.2f} | {oracle} | {erm} |")
    return "\n".join(lines)


def rows_table(report: dict) -> str:
    settings = report["settings"]
    rows = [r for r in ROW_NAMES if any(r in s["models"] for s in settings)]
    lines = ["| row | " + " | ".join(short_name(s) for s in settings) + " |",
             "|---|" + "---|" * len(settings)]
    for r in rows:
        cells = []
        for s in settings:
            m = s["models"].get(r)
            cells.append("not run" if m is None else
                         f"{m['bias']:.3f} (±{m['bias_seed_std']:.3f}, {m['frechet_distance']:.0f})")
        lines.append(f"| {ROW_NAMES[r]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def met_table(report: dict) -> str:
    names = sorted({t for s in report["settings"] for t in s["targets"]})
    lines = ["| setting | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for s in report["settings"]:
        lines.append(f"| {short_name(s)} | " + " | ".join(
            ("met" if s["targets"][t] else "**missed**") if t in s["targets"] else "-" for t in names) + " |")
    return "\n".join(lines)


def main(path: str) -> None:
    with open(path) as f:
        report = json.load(f)
    seeds = report.get("seeds")
    print(f"<!-- made by: python scripts/matrix_tables.py {path} (seeds {seeds}) -->\n")
    print("### Targets (means over seeds, strength 1)\n")
    print(targets_table(report) + "\n")
    print("### Which targets were met\n")
    print(met_table(report) + "\n")
    print("### Every row: Bias (seed std, Frechet distance)\n")
    print(rows_table(report))
    if report.get("not_run"):
        print("\nCells not run: " + "; ".join(report["not_run"]))


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python scripts/matrix_tables.py REPORT.json")
    main(sys.argv[1])
