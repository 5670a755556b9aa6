"""Every size is bounded before compute, seeds are checked alike everywhere, and a refusal that
needs no model answers without importing torch (issue 20).

Before: `--num 1000000000`, `--batch-size 1000000000`, `--resolution 60000`, `--height 100000`
and a prompts line with `num: 1000000000` ended in a MemoryError after the model loaded;
`--seed 2**70` in "Overflow when unpacking long long"; a non-UTF-8 prompts file in a traceback;
and every refusal took 6-14 s because torch was imported first.
"""
import os
import subprocess
import sys

import pytest

from invdiff import limits
from invdiff.cli import main
from tests.test_cli_input import _one_line_error, no_compute, tiny_base  # noqa: F401 (fixtures)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE = ["sample", "--model", "{base}", "--prompt", "digit 1", "--steps", "1"]
BIG = str(10**9)


@pytest.mark.parametrize("argv, fragment", [
    (SAMPLE + ["--num", BIG], "--num"),
    (SAMPLE + ["--batch-size", BIG], "--batch-size"),
    (SAMPLE + ["--height", "100000"], "--height"),
    (SAMPLE + ["--width", "100000"], "--width"),
    (["train-base", "--batch-size", BIG], "--batch-size"),
    (["train-base", "--resolution", "60000"], "--resolution"),
    (["debias", "--base", "{base}", "--resolution", "60000"], "--resolution"),
    (["debias", "--base", "{base}", "--batch-size", BIG], "--batch-size"),
    (SAMPLE + ["--seed", str(2**70)], "--seed"),
    (SAMPLE + ["--seed", "-1"], "--seed"),
    (["sample", "--model", "{base}", "--prompts", "{prompts}", "--seed", "-1"], "--seed"),
    (["sample", "--model", "{base}", "--prompts", "{prompts}", "--seed", str(2**70)], "--seed"),
    (["train-base", "--seed", str(2**70)], "--seed"),
    (["debias", "--base", "{base}", "--seed", "-1"], "--seed"),
])
def test_sizes_and_seeds_are_one_line_before_compute(tiny_base, no_compute, tmp_path, capsys, argv, fragment):
    _, base = tiny_base
    prompts = tmp_path / "p.txt"
    prompts.write_text("digit 1\n")
    argv = [a.format(base=base, prompts=prompts) for a in argv] + ["--out", str(tmp_path / "out")]
    assert main(argv) == 2
    err = _one_line_error(capsys, fragment)
    assert "MemoryError" not in err and "Overflow" not in err
    assert not os.path.exists(tmp_path / "out")


def test_seed_range_is_the_same_for_plain_sample_and_jobs(tiny_base, no_compute, tmp_path, capsys):
    """Image i uses seed + i: the last seed must stay under 2**64 in either form."""
    _, base = tiny_base
    last = str(2**64 - 1)
    assert main([a.format(base=base) for a in SAMPLE] + ["--num", "2", "--seed", last, "--out", str(tmp_path / "o")]) == 2
    _one_line_error(capsys, "--seed", "2**64 - 1")
    prompts = tmp_path / "p.txt"
    prompts.write_text("digit 1\n")
    assert main(["sample", "--model", base, "--prompts", str(prompts), "--num", "2", "--seed", last,
                 "--out", str(tmp_path / "o")]) == 2
    _one_line_error(capsys, "2**64 - 1")


def test_job_line_past_the_image_cap_names_file_and_line(tiny_base, no_compute, tmp_path, capsys):
    _, base = tiny_base
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "digit 1"}\n{"prompt": "digit 2", "num": %s}\n' % BIG)
    assert main(["sample", "--model", base, "--prompts", str(prompts), "--out", str(tmp_path / "o")]) == 2
    _one_line_error(capsys, f"{prompts}:2", "'num'", str(limits.MAX_JOB_IMAGES))


def test_many_small_job_lines_stay_allowed(tmp_path):
    from invdiff.sampling.job import read_prompts

    prompts = tmp_path / "p.txt"
    prompts.write_text("".join(f"digit {i % 10}\n" for i in range(5000)))
    assert len(read_prompts(str(prompts), num=4, seed=0, guidance_scale=1.0)) == 20000


def test_job_total_past_the_cap_is_refused(tmp_path, monkeypatch):
    from invdiff.data.base import DataError
    from invdiff.sampling import job

    monkeypatch.setattr(job, "MAX_JOB_IMAGES", 10)
    prompts = tmp_path / "p.txt"
    prompts.write_text("digit 1\n" * 4)
    with pytest.raises(DataError, match=r"p.txt:4: the job would make more than 10 images"):
        job.read_prompts(str(prompts), num=3, seed=0, guidance_scale=1.0)


def test_plain_sample_that_cannot_fit_in_memory_is_refused(tiny_base, no_compute, tmp_path, monkeypatch, capsys):
    _, base = tiny_base
    monkeypatch.setattr(limits, "available_memory_bytes", lambda: 10**6)
    assert main([a.format(base=base) for a in SAMPLE] + ["--num", "10000", "--out", str(tmp_path / "o")]) == 2
    _one_line_error(capsys, "10000 images", "--prompts job")


def test_non_utf8_prompts_file_names_file_and_line(tiny_base, no_compute, tmp_path, capsys):
    _, base = tiny_base
    prompts = tmp_path / "p.txt"
    prompts.write_bytes(b"digit 1\ndigit \xff2\n")
    assert main(["sample", "--model", base, "--prompts", str(prompts), "--out", str(tmp_path / "o")]) == 2
    _one_line_error(capsys, f"{prompts}:2", "not UTF-8", "0xff")


REFUSALS = [
    ["sample", "--model", "{base}", "--prompt", "digit 1", "--out", "{mine}", "--overwrite"],
    ["sample", "--model", "nobody/x", "--prompt", "digit 1", "--out", "{tmp}/o"],
    ["sample", "--model", "{base}", "--prompts", "{bad}", "--out", "{tmp}/o"],
    ["sample", "--model", "{base}", "--prompt", "digit 1", "--out", "{tmp}/o", "--seed", "-1"],
    ["train-base", "--out", "{mine}", "--overwrite"],
    ["debias", "--base", "{base}", "--out", "{mine}"],
    ["debias", "--base", "{tmp}/missing", "--out", "{tmp}/o"],
    ["evaluate", "--images", "{tmp}/missing", "--out", "{mine}/precious.txt"],
]


@pytest.mark.parametrize("argv", REFUSALS, ids=lambda a: " ".join(a[:2] + a[-2:]))
def test_refusals_that_need_no_model_do_not_import_torch(tiny_base, tmp_path, argv):
    """The refusal is decided from paths, flags and small files alone: torch (6-14 s to import on
    these machines) is never imported. benchmarks/bench_cli_startup.py times the same refusals."""
    _, base = tiny_base
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "precious.txt").write_text("x")
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"\xff\n")
    argv = [a.format(base=base, mine=mine, tmp=tmp_path, bad=bad) for a in argv]
    code = ("import sys; from invdiff.cli import main; rc = main(sys.argv[1:]); "
            "heavy = sorted(m for m in ('torch', 'diffusers', 'transformers', 'numpy') if m in sys.modules); "
            "print('HEAVY', heavy); sys.exit(rc)")
    proc = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert "HEAVY []" in proc.stdout, proc.stdout
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert (mine / "precious.txt").read_text() == "x"
