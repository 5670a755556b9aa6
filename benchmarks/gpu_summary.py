"""gpu_check.sh's last two steps: merge every part's output into one results.json, and print the
short summary table (summary.txt) from it.

    python benchmarks/gpu_summary.py merge --out results.json --steps steps.tsv [--call 1|2|all] [--dry] PART=PATH ...
    python benchmarks/gpu_summary.py table results.json [--out summary.txt]

A PATH is a part's JSON, or the interpreter suite's live report (*.jsonl, one line per finished
test: benchmarks/pytest_live_report.py), reduced to its counts. A part whose file is missing is
kept as {"missing": ...}, so results.json always names every part of its call. `merge` exits 1
when a part reports a failure its step's exit status did not show (an e2e provider that failed
inside a run that exited 0, say), or a kernel benchmark lacks a graded row.

Goals on an H100/H200, in bf16 and fp32, graded in the table at B = 1024 only (GRADED_BATCH):
at B = 16 and 64 a full step's few launches, not its bytes, bound the time, while the copy it is
compared with is one launch, so "% copy" there measures launch overhead, not the kernel:
  invariant loss, full forward + backward (issue 3): >= 80% of a size-matched copy,
  >= 3x reference-eager, >= 1.3x torch.compile;
  guided step (issue 4): >= 80% of a size-matched copy and >= 4x the eager chain.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Dict, List, Tuple

# The parts of each of gpu_check.sh's calls, in the order it runs them.
CALL_PARTS = {
    "1": ("machine", "build", "correctness_triton", "interpreter_suite", "invariant_loss", "correctness_guided_step",
          "guided_step"),
    "2": ("machine", "build", "e2e_train", "e2e_debias", "e2e_sample", "guidance_combine"),
}
PARTS = CALL_PARTS["1"] + tuple(p for p in CALL_PARTS["2"] if p not in CALL_PARTS["1"])
CALL_PARTS["all"] = PARTS
KERNEL_PARTS = ("invariant_loss", "guided_step", "guidance_combine")
GOALS = {"pct_copy": 80.0, "vs_eager": 3.0, "vs_compile": 1.3}
STEP_GOALS = {"pct_copy": 80.0, "vs_eager": 4.0}
GRADED_BATCH = 1024
GRADED_DTYPES = ("fp32", "bf16")
# Statuses of steps.tsv that do not fail a call (gpu_check.sh's record).
PASSING_STATUSES = ("ok", "left out")


def row_batch(row: Dict):
    """A benchmark row's batch size: its "batch", or the B=N of its shape (rows written before
    the benchmarks recorded "batch")."""
    if "batch" in row:
        return row["batch"]
    shape = str(row.get("shape", ""))
    return int(shape.split()[0][2:]) if shape.startswith("B=") else None


def is_graded(row: Dict) -> bool:
    """Whether the goals grade this row: the default fused kernels at GRADED_BATCH (the folded
    group variant is shown beside them), the loss in its full forward + backward."""
    if row_batch(row) != GRADED_BATCH:
        return False
    if row["op"].startswith("guided_step"):
        return row["provider"] == "fused"
    return row["op"] == "invariant_loss" and row["mode"] == "full" and row["provider"] == "triton"


def live_report_counts(path: str) -> Dict:
    """{tests, failures, errors, skipped, failed_tests, finished, ...} of a pytest live report
    (benchmarks/pytest_live_report.py): a line per finished test, and a "finished" line at the
    end that a suite killed at its timeout never wrote."""
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0, "finished": False}
    failed, last = [], None
    with open(path) as f:
        for line in f:
            try:
                record = json.loads(line)
            except ValueError:  # a line cut by the kill
                continue
            if record.get("session") == "finished":
                counts["finished"], counts["exitstatus"] = True, record.get("exitstatus")
                continue
            if "nodeid" not in record:
                continue
            last = record["nodeid"]
            outcome, when = record["outcome"], record["when"]
            if when == "call" or outcome != "passed":
                counts["tests"] += when != "teardown"  # a teardown error follows its test's own line
            if outcome == "skipped":
                counts["skipped"] += 1
            elif outcome == "failed":
                counts["failures" if when == "call" else "errors"] += 1
                failed.append(f"{record['nodeid']} ({when}): {record.get('message', '')}"[:300])
    counts["failed_tests"] = failed[:50]
    if not counts["finished"]:
        counts["cut"] = f"the suite was stopped before its end, after {counts['tests']} tests (last: {last})"
    return counts


def load_part(path: str) -> Dict:
    if not os.path.exists(path):
        return {"missing": f"{os.path.basename(path)} was not written (its step failed, timed out or was skipped)"}
    try:
        if path.endswith(".jsonl"):
            return live_report_counts(path)
        with open(path) as f:
            return json.load(f)
    except Exception as err:  # a truncated file from a killed step: keep the reason, not the run
        return {"missing": f"{os.path.basename(path)} could not be read: {type(err).__name__}: {err}"}


def missing_graded_rows(name: str, part: Dict) -> List[str]:
    """The graded rows (is_graded) a kernel part should hold and does not measure."""
    if name == "invariant_loss":
        wanted = [("invariant_loss", dtype) for dtype in GRADED_DTYPES]
    elif name == "guided_step":
        wanted = [(f"guided_step/{kind}", dtype) for kind in ("ddim", "ddpm") for dtype in GRADED_DTYPES]
    else:
        return []
    have = {(r["op"], r["dtype"]) for r in part.get("rows", []) if "ms" in r and is_graded(r)}
    return [f"{op} {dtype}" for op, dtype in wanted if (op, dtype) not in have]


def part_problems(name: str, part: Dict, dry: bool = False) -> List[str]:
    """Failures inside a part that its exit status may not show."""
    problems = []
    if not isinstance(part, dict) or "missing" in part:
        return problems  # its step's status says why
    for row in part.get("rows", []):
        if "error" in row:
            problems.append(f"{name}: {row.get('provider', '?')} {row.get('batch', '')}: {str(row['error'])[:300]}")
    if part.get("failed"):
        problems.append(f"{name}: {part['failed']} case(s) failed")
    if part.get("failures") or part.get("errors"):
        problems.append(f"{name}: {part.get('failures', 0)} failed, {part.get('errors', 0)} errors")
    if not dry:  # the dry run's tiny batches hold no graded row
        missing = missing_graded_rows(name, part)
        if missing:
            problems.append(f"{name}: no measured graded row at B = {GRADED_BATCH} for {', '.join(missing)}")
    return problems


def read_steps(path: str) -> List[Dict]:
    """gpu_check.sh's steps.tsv: one `name<TAB>status<TAB>seconds<TAB>note` line per step."""
    steps = []
    if path and os.path.exists(path):
        with open(path) as f:
            for line in f:
                name, status, seconds, note = (line.rstrip("\n").split("\t") + ["", "", "", ""])[:4]
                if name:
                    steps.append({"name": name, "status": status, "seconds": float(seconds or 0), "note": note})
    return steps


def merge(out: str, steps_path: str, pairs: List[str], dry: bool, call: str = "all") -> int:
    parts, problems = {}, []
    for pair in pairs:
        name, _, path = pair.partition("=")
        parts[name] = load_part(path)
        problems += part_problems(name, parts[name], dry)
    for name in CALL_PARTS[call]:
        parts.setdefault(name, {"missing": "not run"})
    steps = read_steps(steps_path)
    result = {
        "dry": dry,
        "call": call,
        "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
        "steps": steps,
        "failed_steps": [s["name"] for s in steps if s["status"] not in PASSING_STATUSES],
        "problems": problems,
        "parts": parts,
    }
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
    for p in problems:
        print(f"problem: {p}")
    return 1 if problems else 0


def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def _table(header: List[str], lines: List[List[str]]) -> List[str]:
    widths = [max(len(h), *(len(r[i]) for r in lines)) if lines else len(h) for i, h in enumerate(header)]
    out = ["  ".join(h.ljust(w) for h, w in zip(header, widths))]
    out += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in lines]
    return out


def kernel_lines(parts: Dict) -> Tuple[List[str], int]:
    """The fused providers' rows with their goals marked, and how many graded goals were missed."""
    lines, missed = [], 0
    for name in KERNEL_PARTS:
        for row in parts.get(name, {}).get("rows", []):
            step = row["op"].startswith("guided_step")
            shown = ("fused",) if step else ("triton", "triton-fused-group")
            if row["provider"] not in shown or "ms" not in row:
                continue
            graded = is_graded(row)
            goals = STEP_GOALS if step else GOALS
            verdicts = []
            for key in ("pct_copy", "vs_eager", "vs_compile"):
                value, goal = row.get(key), goals.get(key)
                mark = ""
                if graded and goal is not None:
                    ok = value is not None and value >= goal
                    missed += not ok
                    mark = " ok" if ok else " MISS"
                verdicts.append(_fmt(value) + mark)
            us = lambda k: _fmt(row[k] * 1e3) if row.get(k) is not None else "-"  # noqa: E731
            op = row["op"] + (" (fused group)" if row["provider"] == "triton-fused-group" else "")
            lines.append([op, row["mode"], row["dtype"], row["shape"], us("ms"), us("graph_ms"), us("wall_ms"),
                          _fmt(row.get("bytes", 0) / 1e6), _fmt(row.get("min_bytes", 0) / 1e6), _fmt(row.get("gbs")),
                          verdicts[0], _fmt(row.get("pct_sol")), verdicts[1], verdicts[2]])
    header = ["op", "mode", "dtype", "shape", "us", "graph us", "wall us", "MB", "min MB", "GB/s", "% copy", "% SOL",
              "x eager", "x compile"]
    return _table(header, lines), missed


def e2e_lines(name: str, part: Dict) -> List[str]:
    """An e2e part's rows, every scalar field shown (the e2e scripts own their columns)."""
    rows = part.get("rows", [])
    if not rows:
        return [f"{name}: {part.get('missing', 'no rows')}"]
    keys: List[str] = []
    for r in rows:
        keys += [k for k, v in r.items() if k not in keys and not isinstance(v, (dict, list))]
    context = ", ".join(f"{k} {_fmt(part[k])}" for k in ("config", "device") if k in part)
    cut = "; CUT: its step ended before its last row" if part.get("complete") is False else ""
    return [f"{name} ({context}){cut}"] + _table(keys, [[_fmt(r.get(k)) for k in keys] for r in rows])


def table(results_path: str, out: str = None) -> int:
    with open(results_path) as f:
        results = json.load(f)
    parts = results["parts"]
    machine = parts.get("machine", {})
    call = results.get("call", "all")
    text = [f"== invdiff gpu_check{'' if call == 'all' else ' call ' + call} on {machine.get('device', '?')}"
            f"{' (DRY RUN on the CPU: no timing means anything)' if results.get('dry') else ''}, {results.get('date_utc', '?')} UTC =="]
    text.append("steps: " + ", ".join(f"{s['name']} {s['status']} {s['seconds']:.0f}s" for s in results.get("steps", [])))
    if results.get("failed_steps"):
        text.append("FAILED STEPS: " + ", ".join(results["failed_steps"]))
    for p in results.get("problems", []):
        text.append(f"problem: {p}")
    for p in machine.get("problems", []):
        text.append(f"machine: {p}")
    for name in ("correctness_triton", "correctness_guided_step"):
        if name not in parts:
            continue
        part = parts[name]
        text.append(f"{name}: " + (f"{part['passed']} passed, {part['failed']} failed" if "passed" in part else part.get("missing", "?"))
                    + ("; CUT: the step ended before its last case" if part.get("complete") is False else ""))
        text += [f"  FAIL {c['case']}: {c.get('error', '')[:160]}" for c in part.get("cases", []) if not c.get("ok")]
    for name in [n for n in ("interpreter_suite",) if n in parts]:
        part = parts[name]
        if "tests" in part:
            text.append(f"{name} (pytest): {part['tests']} tests, {part['failures']} failures, {part['errors']} errors, {part['skipped']} skipped"
                        + (f"; CUT: {part['cut']}" if part.get("cut") else ""))
            text += [f"  FAIL {t}" for t in part.get("failed_tests", [])]
        else:
            text.append(f"{name}: {part.get('missing', '?')}")
    kernels, missed = kernel_lines(parts)
    text.append("")
    text.append("fused kernels (us: do_bench, L2 flushed; graph us: CUDA-graph replay, L2 WARM (not flushed); wall us: per call "
                "from Python; % copy: size-matched copy time / kernel time at this design's bytes; % SOL: the same at the minimum bytes)")
    text.append(f"goals, graded at B = {GRADED_BATCH} only (smaller batches are bound by launches, not bytes): invariant_loss/full "
                ">= 80% copy, >= 3x eager, >= 1.3x compile; guided_step >= 80% copy, >= 4x eager chain")
    text += kernels
    text.append(f"goal checks missed: {missed}")
    for name in KERNEL_PARTS:
        part = parts.get(name, {})
        if part.get("stopped_early"):
            text.append(f"{name} stopped early (its time budget): {part['stopped_early']}")
        elif part.get("complete") is False:
            text.append(f"{name} CUT: its step ended before the grid did; {len(part.get('rows', []))} rows kept")
    for name in [n for n in ("e2e_train", "e2e_debias", "e2e_sample") if n in parts]:
        text.append("")
        text += e2e_lines(name, parts[name])
    summary = "\n".join(text) + "\n"
    print(summary, end="")
    if out:
        with open(out, "w") as f:
            f.write(summary)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    m = sub.add_parser("merge", help="merge the parts into one results.json")
    m.add_argument("--out", required=True)
    m.add_argument("--steps", help="gpu_check.sh's steps.tsv")
    m.add_argument("--call", default="all", choices=sorted(CALL_PARTS), help="the gpu_check.sh call whose parts these are")
    m.add_argument("--dry", action="store_true")
    m.add_argument("pairs", nargs="*", metavar="PART=PATH")
    t = sub.add_parser("table", help="print the summary table of a results.json")
    t.add_argument("results")
    t.add_argument("--out")
    args = parser.parse_args(argv)
    if args.command == "merge":
        return merge(args.out, args.steps, args.pairs, args.dry, args.call)
    return table(args.results, args.out)


if __name__ == "__main__":
    sys.exit(main())
