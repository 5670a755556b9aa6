"""A pytest plugin for gpu_check.sh's interpreter_suite: one JSON line per test as it finishes, and
a per-test time limit. Loaded with `-p benchmarks.pytest_live_report` (no conftest, so it can be
added to any run from the repository root):

    python -m pytest -p benchmarks.pytest_live_report --live-report suite.jsonl --per-test-timeout 30 tests/...

--live-report PATH   appends {"nodeid", "when", "outcome", "seconds", "message"?} for each test
                     (its call, or the setup or teardown that failed or skipped it), flushed at
                     once, and {"session": "finished", "exitstatus": N} at the end. A run killed
                     by its step's timeout keeps every line written before the kill, where
                     --junitxml writes nothing until pytest exits; a report without the
                     "finished" line says the suite was cut.
--per-test-timeout S fails a test that runs longer than S seconds (SIGALRM; the main thread, as
                     pytest runs tests), so one hung test costs S seconds, not the step's whole
                     budget. The alarm interrupts Python code, not a blocking call inside C; the
                     step's own `timeout` still bounds that. The device has pytest-timeout and
                     this machine does not: this plugin is the same on both.
"""
from __future__ import annotations

import json
import os
import signal
import time

import pytest


class PerTestTimeout(BaseException):
    """Raised in a test that ran past --per-test-timeout. A BaseException, so Hypothesis does not
    take it for a failing example and re-run (shrink) the test; pytest reports the test failed."""


def pytest_addoption(parser):
    group = parser.getgroup("live report (benchmarks/pytest_live_report.py)")
    group.addoption("--live-report", metavar="PATH", help="append one JSON line per finished test to PATH")
    group.addoption("--per-test-timeout", type=float, default=0.0, metavar="SECONDS",
                    help="fail any test that runs longer than this (0: no limit)")


# The open report (one pytest session per process); a test report carries no config to find it by.
_REPORT = {"stream": None}


def _write(record) -> None:
    if _REPORT["stream"] is not None:
        _REPORT["stream"].write(json.dumps(record) + "\n")
        _REPORT["stream"].flush()


def pytest_configure(config):
    path = config.getoption("--live-report")
    if path:
        # Line-buffered append: each test's line reaches the file when written.
        _REPORT["stream"] = open(path, "a", buffering=1)
        _write({"session": "started", "pid": os.getpid(), "time": time.time()})


def pytest_unconfigure(config):
    if _REPORT["stream"] is not None:
        _REPORT["stream"].close()
        _REPORT["stream"] = None


def pytest_sessionfinish(session, exitstatus):
    _write({"session": "finished", "exitstatus": int(exitstatus)})


def pytest_runtest_logreport(report):
    # One line per test: its call, or the setup/teardown phase that failed or skipped it.
    if report.when == "call" or report.outcome != "passed":
        record = {"nodeid": report.nodeid, "when": report.when, "outcome": report.outcome,
                  "seconds": round(report.duration, 3)}
        if report.outcome != "passed":
            crash = getattr(report.longrepr, "reprcrash", None)  # a failure's "File:line: message"
            text = crash.message if crash is not None else report.longreprtext
            record["message"] = (text.strip().splitlines() or [""])[0][:300]
        _write(record)


def _limited(item):
    """Run one phase of `item` (a hookwrapper's yield) under the per-test alarm. Armed per phase,
    inside pytest's own exception capture (CallInfo.from_call), so that an alarm can never fire
    in pytest's reporting code between phases and end the whole session."""
    limit = item.config.getoption("--per-test-timeout")
    if not limit or not hasattr(signal, "SIGALRM"):
        yield
        return

    def expire(signum, frame):
        raise PerTestTimeout(f"{item.nodeid} ran past --per-test-timeout={limit:g}s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, limit)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_setup(item):
    yield from _limited(item)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    yield from _limited(item)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_teardown(item, nextitem):
    yield from _limited(item)
