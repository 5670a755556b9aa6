"""Start-up time of the command line (issue 12): `invdiff --help` must answer in under 1 s.

    python benchmarks/bench_cli_startup.py --json benchmarks/results/cli_startup.json

Each command runs as a fresh process, as a user types it, `--repeats` times; the median wall
time is reported next to two references measured in the same run: the bare interpreter (the
floor no CLI can beat) and `import torch` (what every command paid before the parser stopped
importing it).
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import write_json  # noqa: E402

COMMANDS = {
    "python -c pass (floor)": [sys.executable, "-c", "pass"],
    "invdiff --help": [sys.executable, "-m", "invdiff.cli", "--help"],
    "invdiff debias --help": [sys.executable, "-m", "invdiff.cli", "debias", "--help"],
    "invdiff sample --strength nan (usage error)": [sys.executable, "-m", "invdiff.cli", "sample", "--model", "m", "--out", "o",
                                              "--strength", "nan"],
    "python -m invdiff.info": [sys.executable, "-m", "invdiff.info"],
    "python -c 'import torch' (reference)": [sys.executable, "-c", "import torch"],
}


def time_command(argv, repeats: int) -> dict:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        times.append(time.perf_counter() - start)
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "runs": times}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
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
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
