"""CLI smoke test: train-base -> debias -> sample -> evaluate on a tiny config, plus bad input."""
import json
import os

import pytest

from invdiff.cli import main
from invdiff.sampling.job import prompt_dirname


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    base, run, imgs = str(root / "base"), str(root / "run"), str(root / "imgs")
    data = ["--resolution", "8"]
    assert main(["train-base", *data, "--steps", "3", "--out", base]) == 0
    assert main([
        "debias", "--base", base, *data, "--out", run, "--groups", "2", "--steps", "2", "--batch-size", "16",
        "--loss-timesteps", "2", "--loss-draws", "1", "--max-step-steps", "5",
    ]) == 0
    assert main(["sample", "--model", run, "--prompt", "digit 3", "--prompt", "digit 4", "--num", "3",
                 "--steps", "2", "--out", imgs]) == 0
    return root, base, run, imgs


def test_pipeline_outputs(tiny_run):
    root, base, run, imgs = tiny_run
    for part in ("unet", "conditioner", "scheduler", "invdiff_base.json"):
        assert os.path.exists(os.path.join(base, part))
    for part in ("guidance", "base", "environments.safetensors", "losses.safetensors", "invdiff_run.json", "train_log.json"):
        assert os.path.exists(os.path.join(run, part))
    pngs = sorted(os.listdir(os.path.join(imgs, prompt_dirname("digit 3"))))
    assert pngs == ["0000.png", "0001.png", "0002.png"]
    assert len(os.listdir(os.path.join(imgs, prompt_dirname("digit 4")))) == 3
    with open(os.path.join(run, "guidance", "config.json")) as f:
        assert json.load(f)["ratio"] == 2.0


def test_evaluate_writes_report(tiny_run, capsys):
    root, _, _, imgs = tiny_run
    out = str(root / "eval.json")
    assert main(["evaluate", "--images", imgs, "--out", out]) == 0
    with open(out) as f:
        result = json.load(f)
    assert 0.0 <= result["bias"] <= 1.0
    assert 0.0 <= result["digit_accuracy"] <= 1.0
    assert sum(map(sum, result["counts"])) == 6


def test_sample_from_base_and_same_seed_same_pixels(tiny_run):
    root, base, _, _ = tiny_run
    a, b = str(root / "a"), str(root / "b")
    for out in (a, b):
        assert main(["sample", "--model", base, "--prompt", "digit 1", "--num", "2", "--steps", "2", "--out", out]) == 0
    for name in ("0000.png", "0001.png"):
        with open(os.path.join(a, prompt_dirname("digit 1"), name), "rb") as fa, \
                open(os.path.join(b, prompt_dirname("digit 1"), name), "rb") as fb:
            assert fa.read() == fb.read()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train-base", "--bias", "0.3", "--out", "{root}/x"], "outside [1/A, 1]"),
        (["train-base", "--bias", "1.2", "--out", "{root}/x"], "outside [1/A, 1]"),
        (["train-base", "--data", "{root}/nope", "--out", "{root}/x"], "does not exist"),
        (["debias", "--base", "{base}", "--resolution", "8", "--groups", "1", "--out", "{root}/r"], "K must be >= 2"),
        (["debias", "--base", "{base}", "--resolution", "8", "--groups", "99999", "--out", "{root}/r"], "too few for K=99999 groups"),
        (["debias", "--base", "{base}", "--resolution", "8", "--ratio", "0", "--out", "{root}/r"], "ratio r must be > 0"),
        (["debias", "--base", "{base}", "--resolution", "8", "--lam", "-1", "--out", "{root}/r"], "lambda must be >= 0"),
        (["debias", "--base", "{root}/missing", "--resolution", "8", "--out", "{root}/r"], "does not exist"),
        (["sample", "--model", "{base}", "--prompt", "digit 42", "--out", "{root}/s"], "unknown prompt"),
        (["sample", "--model", "{root}", "--prompt", "digit 1", "--out", "{root}/s"], "neither an invdiff base model"),
        (["evaluate", "--images", "{root}/none"], "not found"),
    ],
)
def test_bad_input_is_one_clear_error(tiny_run, capsys, argv, message):
    root, base, _, _ = tiny_run
    argv = [a.format(root=root, base=base) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err
    assert len(err.strip().splitlines()) == 1


def test_existing_outputs_are_protected(tiny_run, capsys):
    root, base, run, imgs = tiny_run
    before = sorted(os.listdir(run))
    # a different run into the same folder is refused and leaves the folder untouched
    assert main(["debias", "--base", base, "--resolution", "8", "--out", run, "--groups", "3", "--steps", "2"]) == 2
    assert "different run" in capsys.readouterr().err
    assert sorted(os.listdir(run)) == before
    # a folder that holds something else is refused too
    other = root / "other"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    assert main(["train-base", "--resolution", "8", "--steps", "1", "--out", str(other)]) == 2
    assert (other / "keep.txt").read_text() == "mine"


def test_corrupt_checkpoint(tiny_run, tmp_path, capsys):
    import shutil

    _, base, _, _ = tiny_run
    broken = tmp_path / "broken"
    shutil.copytree(base, broken)
    (broken / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"not a safetensors file")
    assert main(["sample", "--model", str(broken), "--prompt", "digit 1", "--out", str(tmp_path / "s")]) == 2
    assert "could not load" in capsys.readouterr().err
