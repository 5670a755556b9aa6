"""Bad input to the CLI: one line on stderr, exit code 2, before any compute (issue 12).

"Before any compute" is checked by making the compute itself fail the test: the training and
sampling entry points are replaced by functions that raise, so a check that came after them
would surface as a different error or exit code.
"""
import argparse
import json
import os
import re

import pytest

from invdiff import cli
from invdiff.cli import build_parser, describe_group_sizes, main


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli_input")
    base = str(root / "base")
    assert main(["train-base", "--resolution", "8", "--steps", "2", "--out", base]) == 0
    return root, base


@pytest.fixture
def no_compute(monkeypatch):
    """Training, the max step and sampling raise if anything reaches them."""
    import invdiff.debiasing
    import invdiff.environments
    import invdiff.model_folders.load
    import invdiff.sampling
    import invdiff.training

    def forbidden(*args, **kwargs):
        raise AssertionError("compute started before the input was checked")

    monkeypatch.setattr(invdiff.training, "train_base", forbidden)
    monkeypatch.setattr(invdiff.environments, "collect_losses", forbidden)
    monkeypatch.setattr(invdiff.debiasing, "load_base", forbidden)
    monkeypatch.setattr(invdiff.sampling, "sample", forbidden)
    monkeypatch.setattr(invdiff.model_folders.load, "load_model", forbidden)


PROGRESS_BAR = re.compile(r"^[\w -]+: +\d+%\|")


def _one_line_error(capsys, *fragments):
    """The stderr of a refused command: progress bars of the work before it, then one line."""
    err = capsys.readouterr().err
    lines = [line for line in re.split(r"[\r\n]", err) if line.strip() and not PROGRESS_BAR.match(line)]
    assert len(lines) == 1 and lines[0].startswith("invdiff "), err
    assert "Traceback" not in err
    err = lines[0]
    for fragment in fragments:
        assert fragment in err, err
    return err


FLOAT_FLAGS = [
    ["train-base", "--lr"],
    ["train-base", "--bias"],
    ["debias", "--base", "{base}", "--lam"],
    ["debias", "--base", "{base}", "--ratio"],
    ["debias", "--base", "{base}", "--lr"],
    ["debias", "--base", "{base}", "--ema-decay"],
    ["debias", "--base", "{base}", "--importance-mix"],
    ["sample", "--model", "{base}", "--prompt", "digit 1", "--strength"],
    ["sample", "--model", "{base}", "--prompt", "digit 1", "--guidance-scale"],
    ["sample", "--model", "{base}", "--prompt", "digit 1", "--eta-below-band"],
]


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
@pytest.mark.parametrize("flag", FLOAT_FLAGS, ids=lambda f: f"{f[0]}{f[-1]}")
def test_non_finite_floats_are_refused(tiny_base, no_compute, capsys, flag, value):
    root, base = tiny_base
    # "--flag=-inf": argparse reads a bare "-inf" as an option name
    argv = [a.format(base=base) for a in flag[:-1]] + [f"{flag[-1]}={value}", "--out", str(root / "never")]
    assert main(argv) == 2
    _one_line_error(capsys, "not a finite number")
    assert not os.path.exists(root / "never")


@pytest.mark.parametrize("argv", [
    ["train-base", "--steps", "0"],
    ["train-base", "--batch-size", "0"],
    ["debias", "--base", "{base}", "--steps", "0"],
    ["debias", "--base", "{base}", "--batch-size", "0"],
    ["sample", "--model", "{base}", "--prompt", "digit 1", "--num", "0"],
    ["sample", "--model", "{base}", "--prompt", "digit 1", "--steps", "0"],
])
def test_counts_must_be_positive(tiny_base, no_compute, capsys, argv):
    root, base = tiny_base
    assert main([a.format(base=base) for a in argv] + ["--out", str(root / "never")]) == 2
    err = _one_line_error(capsys)
    assert re.search(r"must be (>= 1|in \[1, \d+\])", err), err
    assert not os.path.exists(root / "never")


def test_unknown_scheduler_is_one_line(tiny_base, capsys):
    root, base = tiny_base
    assert main(["sample", "--model", base, "--prompt", "digit 1", "--scheduler", "heun", "--out", str(root / "s")]) == 2
    _one_line_error(capsys, "invalid choice: 'heun'")


@pytest.mark.parametrize("command", [
    ["train-base"],
    ["debias", "--base", "{base}"],
    ["sample", "--model", "{base}", "--prompt", "digit 1"],
])
def test_out_that_is_a_file_is_refused_before_compute(tiny_base, no_compute, tmp_path, capsys, command):
    _, base = tiny_base
    existing = tmp_path / "a_file"
    existing.write_text("keep me")
    assert main([a.format(base=base) for a in command] + ["--out", str(existing)]) == 2
    _one_line_error(capsys, "is an existing file")
    assert existing.read_text() == "keep me"
    # ... and so is an --out under a file
    assert main([a.format(base=base) for a in command] + ["--out", str(existing / "sub")]) == 2
    _one_line_error(capsys, "which is a file")


def test_out_in_a_folder_we_cannot_write_is_refused_before_compute(tiny_base, no_compute, tmp_path, monkeypatch, capsys):
    # The tests may run as root, for whom chmod does not stop writes; the check asks os.access,
    # so the read-only folder is made read-only there.
    _, base = tiny_base
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if os.path.abspath(p) == str(locked) else real_access(p, mode))
    for command in (["train-base"], ["debias", "--base", base], ["sample", "--model", base, "--prompt", "digit 1"]):
        assert main(command + ["--out", str(locked / "new" / "out")]) == 2
        _one_line_error(capsys, "permission denied")
    assert os.listdir(locked) == []


def test_evaluate_out_checked_before_scoring(tiny_base, tmp_path, monkeypatch, capsys):
    import invdiff.metrics

    root, base = tiny_base
    imgs = str(root / "imgs")
    if not os.path.exists(imgs):
        assert main(["sample", "--model", base, "--prompt", "digit 1", "--num", "2", "--steps", "1", "--out", imgs]) == 0
    capsys.readouterr()
    monkeypatch.setattr(invdiff.metrics, "evaluate_samples", lambda *a, **k: pytest.fail("scored before checking --out"))
    assert main(["evaluate", "--images", imgs, "--out", str(tmp_path)]) == 2
    _one_line_error(capsys, "is an existing folder")


def test_missing_model_path_says_so(tiny_base, no_compute, capsys):
    root, _ = tiny_base
    assert main(["sample", "--model", str(root / "no_such_model"), "--prompt", "digit 1", "--out", str(root / "s")]) == 2
    _one_line_error(capsys, "does not exist")


def test_sample_into_folder_with_other_settings_names_only_the_change(tiny_base, capsys):
    root, base = tiny_base
    out = str(root / "samples_settings")
    assert main(["sample", "--model", base, "--prompt", "digit 2", "--num", "1", "--steps", "1", "--out", out]) == 0
    capsys.readouterr()
    assert main(["sample", "--model", base, "--prompt", "digit 2", "--num", "1", "--steps", "2", "--out", out]) == 2
    err = _one_line_error(capsys, "steps: 1 -> 2")
    assert "model" not in err.split("(", 1)[1]  # only what differs, not the whole settings dict


def test_debias_into_other_run_names_only_the_change(tiny_base, capsys):
    root, base = tiny_base
    run = str(root / "run_settings")
    common = ["debias", "--base", base, "--resolution", "8", "--out", run, "--steps", "1", "--batch-size", "8",
              "--loss-timesteps", "2"]
    assert main(common) == 0
    out = capsys.readouterr().out
    # The last line labels the inferred group sizes per prompt.
    assert "inferred group sizes per prompt (K=2): digit 0:" in out
    assert main(common[:-2] + ["--loss-timesteps", "3"]) == 2
    err = _one_line_error(capsys, "different run", "config.loss_timesteps: 2 -> 3")
    assert "config.lam" not in err


def test_one_image_dataset_names_too_few_samples(tmp_path, capsys):
    from PIL import Image

    folder = tmp_path / "one"
    folder.mkdir()
    Image.new("RGB", (8, 8), (255, 0, 0)).save(folder / "a.png")
    (folder / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png", "text": "a cat"}) + "\n")
    base = tmp_path / "base"
    assert main(["train-base", "--data", str(folder), "--steps", "1", "--batch-size", "1", "--out", str(base)]) == 0
    capsys.readouterr()
    assert main(["debias", "--base", str(base), "--data", str(folder), "--out", str(tmp_path / "run")]) == 2
    _one_line_error(capsys, "the dataset has 1 sample: too few for K=2 groups")


def test_group_sizes_are_labelled():
    assert describe_group_sizes([9.0, 1.0, 8.0, 2.0], 2, ["digit 0", "digit 1"]) == (
        "inferred group sizes per prompt (K=2): digit 0: 9 | 1; digit 1: 8 | 2")
    assert describe_group_sizes([17.0, 3.0], 2, ["digit 0", "digit 1"]) == (
        "inferred group sizes (K=2, pooled over prompts): 17 | 3")


@pytest.mark.parametrize("command", [
    ["train-base", "--resolution", "8", "--steps", "1"],
    ["sample", "--model", "{base}", "--prompt", "digit 1", "--num", "1", "--steps", "1"],
    ["debias", "--base", "{base}", "--resolution", "8", "--steps", "1", "--loss-timesteps", "2"],
])
def test_ctrl_c_is_one_line_exit_130_and_leaves_nothing(tiny_base, tmp_path, monkeypatch, capsys, command):
    import invdiff.debiasing
    import invdiff.sampling
    import invdiff.training

    _, base = tiny_base

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(invdiff.training, "train_base", interrupt)
    monkeypatch.setattr(invdiff.training, "train_guidance", interrupt)
    monkeypatch.setattr(invdiff.debiasing, "train_guidance", interrupt)
    monkeypatch.setattr(invdiff.sampling, "sample", interrupt)
    out = tmp_path / "out"
    assert main([a.format(base=base) for a in command] + ["--out", str(out)]) == 130
    _one_line_error(capsys, "interrupted")
    assert os.listdir(tmp_path) == []  # no output folder, no staging folder beside it


def test_non_finite_loss_stops_training_and_saves_nothing(tmp_path, monkeypatch, capsys):
    import torch

    import invdiff.training

    real = invdiff.training.ops.invariant_loss
    monkeypatch.setattr(invdiff.training.ops, "invariant_loss",
                        lambda *a, **k: real(*a, **k) * torch.tensor(float("nan")))
    out = tmp_path / "base"
    assert main(["train-base", "--resolution", "8", "--steps", "3", "--out", str(out)]) == 2
    _one_line_error(capsys, "loss became nan at step 0", "nothing was saved")
    assert os.listdir(tmp_path) == []


def test_non_finite_min_step_loss_saves_no_run(tiny_base, tmp_path, monkeypatch, capsys):
    import invdiff.training

    _, base = tiny_base
    real = invdiff.training.ops.invariant_loss_with_stats

    def poisoned(*args, **kwargs):
        stats = real(*args, **kwargs)
        return stats._replace(loss=stats.loss * float("inf"))

    monkeypatch.setattr(invdiff.training.ops, "invariant_loss_with_stats", poisoned)
    run = tmp_path / "run"
    assert main(["debias", "--base", base, "--resolution", "8", "--steps", "2", "--batch-size", "8",
                 "--loss-timesteps", "2", "--out", str(run)]) == 2
    _one_line_error(capsys, "min step: the loss became", "nothing was saved")
    assert os.listdir(tmp_path) == []


def test_progress_bar_shows_the_current_loss(monkeypatch):
    """The bar's loss is refreshed every step, so at the end it is the last steps' loss (it used
    to stay at the first step's value on short runs)."""
    import invdiff.training
    from invdiff.training import BaseTrainConfig, train_base
    from tests.utils import TINY_BASE_CONFIG, tiny_dataset

    shown = []

    class RecordingBar:
        def __init__(self, *args, **kwargs):
            pass

        def set_postfix(self, refresh=True, **values):
            shown.append(values)

        def update(self, n=1):
            pass

        def close(self):
            pass

    monkeypatch.setattr(invdiff.training, "tqdm", RecordingBar)
    model = train_base(tiny_dataset(), BaseTrainConfig(steps=3, **TINY_BASE_CONFIG))
    assert len(shown) == 3
    assert shown[-1]["loss"] == f"{model.meta['final_loss']:.4f}"  # the mean over all 3 steps
    assert shown[0]["loss"] != shown[-1]["loss"]


def _option_actions(parser):
    return [a for a in parser._actions
            if a.option_strings and not isinstance(a, (argparse._HelpAction, argparse._SubParsersAction))]


def test_every_flag_has_help_with_its_default():
    parser = build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, sub in subparsers.choices.items():
        text = sub.format_help()
        for action in _option_actions(sub):
            assert action.help, f"{name} {action.option_strings[0]} has no help"
        assert text.count("(default:") == len(_option_actions(sub)), f"{name}: a flag's default is not shown"
    train_help = subparsers.choices["train-base"].format_help()
    for flag in ("--steps", "--lr", "--batch-size", "--seed", "--overwrite"):
        assert flag in train_help


def test_help_does_not_import_torch():
    """`invdiff --help` answers without importing torch or diffusers (its start-up time is in
    benchmarks/bench_cli_startup.py)."""
    import subprocess
    import sys

    code = ("import sys\nfrom invdiff.cli import build_parser\n"
            "for argv in (['--help'], ['debias', '--help'], ['sample', '--help']):\n"
            "    try:\n        build_parser().parse_args(argv)\n    except SystemExit:\n        pass\n"
            "print(sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]"


def test_evaluate_reads_a_prompts_job_folder(tiny_base, tmp_path, capsys):
    """`evaluate --images JOB_DIR` reads a job's manifest.jsonl as it reads a plain manifest.json."""
    _, base = tiny_base
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("digit 1\ndigit 2\n")
    job = tmp_path / "job"
    assert main(["sample", "--model", base, "--prompts", str(prompts), "--num", "2", "--steps", "1",
                 "--out", str(job)]) == 0
    assert os.path.isfile(job / "manifest.jsonl")
    capsys.readouterr()
    assert main(["evaluate", "--images", str(job), "--out", str(tmp_path / "eval.json")]) == 0
    result = json.loads((tmp_path / "eval.json").read_text())
    assert sum(map(sum, result["counts"])) == 4


def test_evaluate_on_one_image_skips_what_needs_more(tiny_base, tmp_path, capsys):
    _, base = tiny_base
    one = tmp_path / "one"
    assert main(["sample", "--model", base, "--prompt", "digit 5", "--num", "1", "--steps", "1", "--out", str(one)]) == 0
    capsys.readouterr()
    assert main(["evaluate", "--images", str(one)]) == 0
    captured = capsys.readouterr()
    assert "precision/recall skipped" in captured.err
    assert "Frechet" in captured.err or "frechet" in captured.err.lower()
    assert json.loads(captured.out)["bias"] is not None  # the rest is still reported


@pytest.mark.parametrize("flag", ["--inception-weights", "--clip-model"])
def test_evaluate_missing_weights_path_is_one_line_before_scoring(tiny_base, tmp_path, monkeypatch, capsys, flag):
    import invdiff.metrics

    _, base = tiny_base
    imgs = tmp_path / "imgs"
    assert main(["sample", "--model", base, "--prompt", "digit 1", "--num", "1", "--steps", "1", "--out", str(imgs)]) == 0
    capsys.readouterr()
    monkeypatch.setattr(invdiff.metrics, "evaluate_samples", lambda *a, **k: pytest.fail("scored before checking"))
    assert main(["evaluate", "--images", str(imgs), flag, str(tmp_path / "no_such_weights")]) == 2
    _one_line_error(capsys, "no_such_weights")


def test_debias_data_at_another_resolution_than_the_base_is_refused(tiny_base, tmp_path, monkeypatch, capsys):
    import invdiff.environments

    _, base = tiny_base  # trained at 8x8
    monkeypatch.setattr(invdiff.environments, "collect_losses", lambda *a, **k: pytest.fail("max step ran"))
    assert main(["debias", "--base", base, "--resolution", "16", "--out", str(tmp_path / "run")]) == 2
    _one_line_error(capsys, "the data is 16x16 but the base model was trained at 8x8; pass --resolution 8")
    assert os.listdir(tmp_path) == []


def test_sample_reports_the_attention_it_really_used(tiny_base, tmp_path, capsys):
    """The printed backend and the manifest's agree (the tiny base has no attention layers, so
    "sdpa" was asked for but nothing runs through it)."""
    _, base = tiny_base
    out = tmp_path / "s"
    assert main(["sample", "--model", base, "--prompt", "digit 1", "--num", "1", "--steps", "1", "--out", str(out)]) == 0
    printed = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("attention: "))
    manifest = json.loads((out / "manifest.json").read_text())
    assert printed == f"attention: {manifest['attention_used']}"
    assert manifest["attention_used"].startswith("none")
    assert manifest["settings"]["attention"] == "sdpa"  # what was asked, kept apart from what ran
