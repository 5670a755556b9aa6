"""Start-up time of the command line: `invdiff --help` (issue 12) and every refusal that needs
no model (issue 20) must answer in under 1 s.

    python benchmarks/bench_cli_startup.py --json benchmarks/results/cli_startup.json

Each command runs as a fresh process, as a user types it, `--repeats` times; the median wall
time is reported next to two references measured in the same run: the bare interpreter (the
floor no CLI can beat) and `import torch` (what every command paid before the parser stopped
importing it). The refusals run against the shipped base and a scratch folder holding one file
of the user's; each must exit 2 (checked), or the benchmark fails.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import write_json  # noqa: E402

BASE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "invdiff", "assets", "base_p0.9")
SCRATCH = tempfile.mkdtemp(prefix="invdiff-bench-cli-")
MINE = os.path.join(SCRATCH, "mine")  # a folder of the user's: one file invdiff did not make
BAD_PROMPTS = os.path.join(SCRATCH, "bad.txt")  # not UTF-8 on line 2
CLI = [sys.executable, "-m", "invdiff.cli"]
# Refusals that need no model: each must exit 2 in well under a second (issue 20).
REFUSALS = {
    "refuse: sample --overwrite into a user's folder": CLI + ["sample", "--model", BASE, "--prompt", "digit 1", "--out", MINE,
                                                            "--overwrite"],
    "refuse: sample --model nobody/x (offline)": CLI + ["sample", "--model", "nobody/x", "--prompt", "x", "--out",
                                                       os.path.join(SCRATCH, "o")],
    "refuse: sample --prompts non-UTF-8 file": CLI + ["sample", "--model", BASE, "--prompts", BAD_PROMPTS, "--out",
                                                     os.path.join(SCRATCH, "o")],
    "refuse: sample --seed 2**70": CLI + ["sample", "--model", BASE, "--prompt", "digit 1", "--seed", str(2**70), "--out",
                                         os.path.join(SCRATCH, "o")],
    "refuse: sample --height 100000": CLI + ["sample", "--model", BASE, "--prompt", "digit 1", "--height", "100000",
                                            "--out", os.path.join(SCRATCH, "o")],
    "refuse: debias --out . (working folder)": CLI + ["debias", "--base", BASE, "--out", "."],
    "refuse: train-base --out a user's folder": CLI + ["train-base", "--out", MINE, "--overwrite"],
}
COMMANDS = {
    "python -c pass (floor)": [sys.executable, "-c", "pass"],
    "invdiff --help": [sys.executable, "-m", "invdiff.cli", "--help"],
    "invdiff debias --help": [sys.executable, "-m", "invdiff.cli", "debias", "--help"],
    "invdiff sample --strength nan (usage error)": [sys.executable, "-m", "invdiff.cli", "sample", "--model", "m", "--out", "o",
                                              "--strength", "nan"],
    "python -m invdiff.info": [sys.executable, "-m", "invdiff.info"],
    **REFUSALS,
    "python -c 'import torch' (reference)": [sys.executable, "-c", "import torch"],
}


def time_command(argv, repeats: int) -> dict:
    times, codes = [], set()
    for _ in range(repeats):
        start = time.perf_counter()
        codes.add(subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode)
        times.append(time.perf_counter() - start)
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "runs": times,
            "exit_codes": sorted(codes)}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    os.makedirs(MINE, exist_ok=True)
    with open(os.path.join(MINE, "precious.txt"), "w") as f:
        f.write("the user's\n")
    with open(BAD_PROMPTS, "wb") as f:
        f.write(b"digit 1\ndigit \xff\n")
    result = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "python": platform.python_version(),
              "date": time.strftime("%Y-%m-%d"), "repeats": args.repeats, "commands": {}}
    for name, command in COMMANDS.items():
        result["commands"][name] = time_command(command, args.repeats)
        print(f"{name:40s} median {result['commands'][name]['median_s']:.3f} s", flush=True)
    help_s = result["commands"]["invdiff --help"]["median_s"]
    result["help_under_1s"] = help_s < 1.0
    result["help_vs_import_torch"] = help_s / result["commands"]["python -c 'import torch' (reference)"]["median_s"]
    print(f"invdiff --help: {help_s:.3f} s (target < 1 s: {'met' if help_s < 1.0 else 'MISSED'}); "
          f"{result['help_vs_import_torch']:.2f}x the time of importing torch")
    refusals = {name: result["commands"][name] for name in REFUSALS}
    wrong = [name for name, r in refusals.items() if r["exit_codes"] != [2]]
    slowest = max(refusals, key=lambda name: refusals[name]["median_s"])
    result["slowest_refusal"] = {"command": slowest, "median_s": refusals[slowest]["median_s"]}
    result["refusals_under_1s"] = refusals[slowest]["median_s"] < 1.0 and not wrong
    print(f"slowest refusal: {slowest}: {refusals[slowest]['median_s']:.3f} s (target < 1 s: "
          f"{'met' if result['refusals_under_1s'] else 'MISSED'})")
    if wrong:
        raise SystemExit(f"refusals that did not exit 2: {wrong}")
    if not os.path.isfile(os.path.join(MINE, "precious.txt")):
        raise SystemExit("a refusal removed the user's file")
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    try:
        main()
    finally:
        import shutil

        shutil.rmtree(SCRATCH, ignore_errors=True)  # the benchmark's own scratch folder
