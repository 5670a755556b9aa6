"""A user's files are sacred (issue 20): no command deletes what it did not make, no two outputs
collide, one writer at a time, and SIGTERM cleans up like Ctrl-C.

Each test here failed before its fix: `--overwrite` deleted a folder that held only the user's
file, prompts "a b", "a/b" and "a_b" shared one folder, two runs into one --out both "saved",
and a SIGTERM left the frozen-prediction bank (gigabytes on real data) beside the output.
"""
import json
import os
import signal
import subprocess
import sys

import pytest

from invdiff import outputs
from invdiff.cli import main
from invdiff.errors import OutputError
from invdiff.sampling.job import prompt_dirname
from tests.test_cli_input import _one_line_error, no_compute, tiny_base  # noqa: F401 (fixtures)

SAMPLE = ["sample", "--model", "{base}", "--prompt", "digit 1", "--num", "1", "--steps", "1"]
COMMANDS = {
    "train-base": ["train-base", "--resolution", "8", "--steps", "1"],
    "debias": ["debias", "--base", "{base}", "--resolution", "8", "--steps", "1", "--loss-timesteps", "2"],
    "sample": SAMPLE,
    "sample-job": ["sample", "--model", "{base}", "--prompts", "{prompts}", "--steps", "1"],
}


def _argv(command, base, tmp_path, out):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("digit 1\n")
    return [a.format(base=base, prompts=prompts) for a in COMMANDS[command]] + ["--out", str(out)]


# ----------------------------------------------------------------------------- --overwrite


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_overwrite_never_deletes_a_folder_invdiff_did_not_make(tiny_base, no_compute, tmp_path, capsys, command):
    _, base = tiny_base
    out = tmp_path / "mine"
    out.mkdir()
    (out / "precious.txt").write_text("a year of work")
    assert main(_argv(command, base, tmp_path, out) + ["--overwrite"]) == 2
    _one_line_error(capsys, "was not made by invdiff", "--overwrite included")
    assert os.listdir(out) == ["precious.txt"] and (out / "precious.txt").read_text() == "a year of work"


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_working_folder_and_above_are_refused(tiny_base, no_compute, tmp_path, monkeypatch, capsys, command):
    _, base = tiny_base
    work = tmp_path / "project"
    work.mkdir()
    (work / "train.py").write_text("print('sources')")
    monkeypatch.chdir(work)
    argv = _argv(command, base, tmp_path, "x")[:-1]
    for out, what in [(str(work), "the working folder"), (".", "the working folder"), ("..", "above the working folder"),
                      ("/", "the root folder")]:
        assert main(argv + [out, "--overwrite"]) == 2
        _one_line_error(capsys, what)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    assert main(argv + [str(tmp_path / "home"), "--overwrite"]) == 2
    _one_line_error(capsys, "home folder")
    assert os.listdir(work) == ["train.py"]


@pytest.mark.parametrize("out", ["", "link"])
def test_empty_out_and_symlinked_out_are_refused(tiny_base, no_compute, tmp_path, monkeypatch, capsys, out):
    _, base = tiny_base
    monkeypatch.chdir(tmp_path)
    (tmp_path / "target").mkdir()
    os.symlink(tmp_path / "target", tmp_path / "link")
    before = sorted(os.listdir(tmp_path.parent))
    assert main([a.format(base=base) for a in SAMPLE] + ["--out", out]) == 2
    _one_line_error(capsys, "is empty" if out == "" else "symbolic link")
    assert os.path.islink(tmp_path / "link") and os.listdir(tmp_path / "target") == []
    assert sorted(os.listdir(tmp_path.parent)) == before  # no staging folder in the parent


def test_overwrite_replaces_invdiffs_own_samples_but_not_with_a_foreign_file(tiny_base, tmp_path, capsys):
    _, base = tiny_base
    out = tmp_path / "samples"
    argv = [a.format(base=base) for a in SAMPLE] + ["--out", str(out)]
    assert main(argv) == 0
    marker = outputs.read_marker(str(out))
    assert marker["kind"] == "samples" and set(marker["entries"]) == set(os.listdir(out)) - {outputs.MARKER}
    assert main(argv + ["--seed", "5"]) == 2  # other settings need --overwrite
    capsys.readouterr()
    assert main(argv + ["--seed", "5", "--overwrite"]) == 0
    assert json.loads((out / "manifest.json").read_text())["settings"]["seed"] == 5
    (out / "notes.txt").write_text("mine")
    assert main(argv + ["--seed", "6", "--overwrite"]) == 2
    _one_line_error(capsys, "did not make", "'notes.txt'")
    assert (out / "notes.txt").read_text() == "mine"


def test_one_kind_of_output_does_not_replace_another(tiny_base, no_compute, tmp_path, capsys):
    root, base = tiny_base
    assert main([a.format(base=base) for a in SAMPLE] + ["--out", base, "--overwrite"]) == 2
    _one_line_error(capsys, "holds a base model, not samples")
    assert os.path.isfile(os.path.join(base, outputs.MARKER))


def test_job_overwrite_replaces_the_old_job_whole(tiny_base, tmp_path, capsys):
    _, base = tiny_base
    out = tmp_path / "job"
    prompts = tmp_path / "p.txt"
    prompts.write_text("digit 1\ndigit 2\n")
    argv = ["sample", "--model", base, "--prompts", str(prompts), "--steps", "1", "--out", str(out)]
    assert main(argv) == 0
    first = {d for d in os.listdir(out) if d.startswith("digit")}
    assert len(first) == 2
    prompts.write_text("digit 3\n")
    assert main(argv + ["--overwrite"]) == 0
    # the images of the old job's settings are gone, not left beside the new ones
    assert {d for d in os.listdir(out) if d.startswith("digit")} == {prompt_dirname("digit 3")}
    assert set(outputs.read_marker(str(out))["entries"]) == set(os.listdir(out)) - {outputs.MARKER}


def test_evaluate_does_not_overwrite_a_file_it_did_not_write(tiny_base, tmp_path, capsys):
    _, base = tiny_base
    samples = tmp_path / "s"
    assert main([a.format(base=base) for a in SAMPLE] + ["--out", str(samples)]) == 0
    report = tmp_path / "report.json"
    report.write_text("{\"mine\": 1}")
    assert main(["evaluate", "--images", str(samples), "--out", str(report)]) == 2
    _one_line_error(capsys, "was not written by invdiff evaluate")
    assert report.read_text() == "{\"mine\": 1}"
    fresh = tmp_path / "fresh.json"
    assert main(["evaluate", "--images", str(samples), "--out", str(fresh)]) == 0
    assert main(["evaluate", "--images", str(samples), "--out", str(fresh)]) == 0  # its own file: replaced


def test_foreign_checkpoint_dir_is_refused(tiny_base, no_compute, tmp_path, capsys):
    _, base = tiny_base
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "checkpoint_0").mkdir()  # a folder rotation would remove
    argv = _argv("debias", base, tmp_path, tmp_path / "run") + ["--checkpoint-every", "1", "--checkpoint-dir", str(ckpt)]
    assert main(argv) == 2
    _one_line_error(capsys, "holds no invdiff checkpoints")
    assert os.listdir(ckpt) == ["checkpoint_0"]


# ----------------------------------------------------------------------------- prompt folders


def test_prompt_folders_are_one_to_one_and_bounded():
    prompts = ["a b", "a/b", "a_b", "a  b", "A b", "🙂🙂", "日本語", "🙃", "x" * 300, "x" * 301, "..", "-"]
    names = [prompt_dirname(p) for p in prompts]
    assert len(set(names)) == len(prompts)
    for name in names:
        assert len(name.encode()) <= 64 and "/" not in name and not name.startswith(".")
        assert name.isascii()
    assert prompt_dirname("digit 3").startswith("digit_3-")
    assert prompt_dirname("digit 3") == prompt_dirname("digit 3")  # stable across calls and processes


def test_colliding_prompts_keep_their_own_images(tiny_sd, tmp_path, capsys):
    """On a text-conditioned base any prompt is allowed: "a b", "a/b" and "a_b" wrote into one
    folder, and the manifest pointed three prompts at the same PNGs."""
    out = tmp_path / "s"
    prompts = ["a b", "a/b", "a_b", "🙂", "long " * 60]
    argv = ["sample", "--model", tiny_sd, "--num", "1", "--steps", "1", "--height", "16", "--width", "16", "--out", str(out)]
    for p in prompts:
        argv += ["--prompt", p]
    assert main(argv) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    paths = [e["path"] for e in manifest["images"]]
    assert len(set(paths)) == len(prompts) and all((out / p).is_file() for p in paths)
    assert manifest["prompt_folders"] == {p: prompt_dirname(p) for p in prompts}


def test_job_with_colliding_prompts_and_equal_seeds(tiny_sd, tmp_path):
    out = tmp_path / "job"
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": p, "seed": 7, "num": 1}) for p in ["a b", "a/b", "a_b"]) + "\n")
    assert main(["sample", "--model", tiny_sd, "--prompts", str(prompts), "--steps", "1", "--height", "16",
                 "--width", "16", "--out", str(out)]) == 0
    records = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert len({r["path"] for r in records}) == 3


# ----------------------------------------------------------------------------- one writer at a time


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_second_writer_is_refused_while_the_first_holds_the_output(tiny_base, no_compute, tmp_path, capsys, command):
    _, base = tiny_base
    out = tmp_path / "out"
    with outputs.output_lock(str(out)):
        assert main(_argv(command, base, tmp_path, out)) == 2
    err = _one_line_error(capsys, "being written by another invdiff process")
    assert f"pid {os.getpid()}" in err
    assert not os.path.exists(out)
    assert not os.path.exists(outputs.lock_path(str(out)))  # the holder removes its lock file


def test_a_dead_processs_lock_does_not_block(tmp_path):
    out = tmp_path / "out"
    child = subprocess.Popen([sys.executable, "-c", (
        "import os, sys, time; sys.path.insert(0, os.getcwd()); from invdiff.outputs import output_lock\n"
        f"with output_lock({str(out)!r}):\n    print('held', flush=True); time.sleep(60)")],
        stdout=subprocess.PIPE, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert child.stdout.readline().strip() == b"held"
    with pytest.raises(OutputError):
        with outputs.output_lock(str(out)):
            pass
    child.kill()
    child.wait()
    assert os.path.exists(outputs.lock_path(str(out)))  # SIGKILL leaves the file ...
    with outputs.output_lock(str(out)):  # ... but not the lock
        pass


# ----------------------------------------------------------------------------- SIGTERM and temporaries


def test_sigterm_during_sd_debias_removes_the_bank_and_keeps_the_old_output(tiny_sd, tiny_sd_data, tmp_path, monkeypatch,
                                                                            capsys):
    import invdiff.debiasing

    out = tmp_path / "run"
    out.mkdir()
    outputs.write_marker(str(out), "run", ["invdiff_run.json"])
    (out / "invdiff_run.json").write_text("{}")  # an earlier run (its settings do not matter with --overwrite)
    seen = {}

    def terminate(*args, **kwargs):
        seen["bank"] = [n for n in os.listdir(tmp_path) if n.startswith(".invdiff-frozen-bank-")]
        os.kill(os.getpid(), signal.SIGTERM)
        raise AssertionError("SIGTERM did not stop the run")

    monkeypatch.setattr(invdiff.debiasing, "train_guidance", terminate)
    argv = ["debias", "--base", tiny_sd, "--data", tiny_sd_data, "--steps", "1", "--loss-timesteps", "2",
            "--batch-size", "8", "--out", str(out), "--overwrite"]
    assert main(argv) == 128 + signal.SIGTERM
    _one_line_error(capsys, "terminated (SIGTERM)")
    assert len(seen["bank"]) == 1  # the bank existed while the run did
    assert sorted(os.listdir(tmp_path)) == ["run"]  # no bank, no staging folder, no lock file
    assert (out / "invdiff_run.json").read_text() == "{}"
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is the command's only


def test_stale_temporaries_of_dead_processes_are_swept(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    own = outputs.owned_prefix(".invdiff-frozen-bank-")
    stale = tmp_path / own.replace(f".{os.getpid()}.", f".{dead.pid}.").__add__("abc12345")
    stale.mkdir()
    (stale / "pred.fp16").write_bytes(b"\0" * 16)
    alive = tmp_path / (own + "abc12345")
    alive.mkdir()
    other_host = tmp_path / f".invdiff-frozen-bank-elsewhere.{dead.pid}.abc12345"
    other_host.mkdir()
    users = tmp_path / ".invdiff-frozen-bank-notes"
    users.mkdir()
    assert outputs.sweep_stale_temporaries(str(tmp_path), ".invdiff-frozen-bank-") == [str(stale)]
    assert sorted(os.listdir(tmp_path)) == sorted(p.name for p in (alive, other_host, users))


def test_staging_folder_of_a_killed_run_is_removed_by_the_next(tiny_base, tmp_path):
    from invdiff.io import staged_directory

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / outputs.owned_prefix(".out.partial.").replace(f".{os.getpid()}.", f".{dead.pid}.").__add__("0123456789ab")
    stale.mkdir()
    with staged_directory(str(tmp_path / "out"), kind="samples") as stage:
        open(os.path.join(stage, "x.txt"), "w").close()
    assert sorted(os.listdir(tmp_path)) == ["out"]
    assert outputs.read_marker(str(tmp_path / "out"))["entries"] == ["x.txt"]


def test_an_interrupted_demo_resumes_from_its_cells(tmp_path, monkeypatch, capsys):
    """The demo caches cells as it goes; its folder is marked before the first one, so a run cut
    short is still invdiff's own and the next run reuses it rather than refusing it."""
    import invdiff.demo

    out = tmp_path / "demo"

    def cut_short(*args, **kwargs):
        raise KeyboardInterrupt  # Ctrl-C while the first setting's data is built, after the marker

    monkeypatch.setattr(invdiff.demo, "_Data", cut_short)
    assert main(["demo", "--quick", "--out", str(out)]) == 130
    assert os.path.isdir(out / "cells") and outputs.read_marker(str(out))["entries"] == ["cells"]
    monkeypatch.undo()
    monkeypatch.setattr(invdiff.demo, "_write_report", lambda out_dir, *a: open(os.path.join(out_dir, "report.md"), "w").close())
    assert main(["demo", "--quick", "--out", str(out), "--cached-only"]) == 0  # the cut-short folder is reused
    assert set(outputs.read_marker(str(out))["entries"]) == {"cells", "report.md"}
    (out / "mine.txt").write_text("x")
    capsys.readouterr()
    assert main(["demo", "--out", str(out)]) == 2
    err = _one_line_error(capsys, "'mine.txt'")
    assert "--overwrite" not in err  # demo has no such flag


def test_a_marker_cannot_name_anything_outside_its_folder(tmp_path):
    """A job replaced with --overwrite removes what its marker lists, and a marker is a file
    anybody can write: an entry with a path in it makes the marker worthless, not obeyed."""
    out = tmp_path / "job"
    out.mkdir()
    (tmp_path / "precious").mkdir()
    for entry in ["../precious", "a/b", "..", ".", ""]:
        (out / outputs.MARKER).write_text(json.dumps({"kind": "sample-job", "entries": [entry]}))
        assert outputs.read_marker(str(out)) is None
        with pytest.raises(OutputError, match="was not made by invdiff"):
            outputs.check_output_folder(str(out), "sample-job", overwrite=True)
    assert (tmp_path / "precious").is_dir()


def test_a_file_put_into_the_output_during_the_run_is_kept_with_the_new_output(tmp_path):
    from invdiff.io import staged_directory

    out = tmp_path / "out"
    with staged_directory(str(out), kind="samples") as stage:
        open(os.path.join(stage, "a.png"), "w").close()
    with pytest.raises(OutputError, match="gained files invdiff did not make") as info:
        with staged_directory(str(out), kind="samples") as stage:
            open(os.path.join(stage, "b.png"), "w").close()
            (out / "notes.txt").write_text("mine")  # the user, meanwhile
    assert sorted(os.listdir(out)) == sorted([outputs.MARKER, "a.png", "notes.txt"])
    kept = str(info.value).split("the new output is at ")[1].strip("'")
    assert os.listdir(kept) and "b.png" in os.listdir(kept)
