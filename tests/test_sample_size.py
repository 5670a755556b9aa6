"""`invdiff sample --height/--width`: by default a run samples at the size it trained at, a base at
its native size; a size the VAE cannot decode is one error line before anything is loaded
(issue 13). On the tiny SD folder (conftest.tiny_sd: VAE factor 2, native size 16 pixels)."""
import json
import os
import re

import pytest
import torch
from PIL import Image

import invdiff.model_folders.load
from invdiff.cli import build_parser, main
from invdiff.model_folders import sampling_size


@pytest.fixture(scope="module")
def run_at_12(tiny_sd, tiny_sd_data, tmp_path_factory):
    """A debias run on 16-pixel images resized to 12: trained at 12, where the UNet's native size is 16."""
    run = str(tmp_path_factory.mktemp("size_run") / "run")
    assert main(["debias", "--base", tiny_sd, "--data", tiny_sd_data, "--resolution", "12", "--out", run, "--steps", "1",
                 "--batch-size", "8", "--loss-timesteps", "2", "--loss-draws", "1"]) == 0
    return run


def _sizes(folder):
    """{(width, height)} of the PNGs under `folder`."""
    return {Image.open(os.path.join(root, n)).size for root, _, names in os.walk(folder) for n in names if n.endswith(".png")}


def _sample(model, out, *flags):
    return main(["sample", "--model", model, "--prompt", "a red square", "--num", "1", "--steps", "1", "--out", out, *flags])


def test_a_run_samples_at_its_training_resolution_by_default(run_at_12, tmp_path):
    with open(os.path.join(run_at_12, "invdiff_run.json")) as f:
        assert json.load(f)["resolution"] == 12
    assert sampling_size(run_at_12) == (12, 12)
    assert _sample(run_at_12, str(tmp_path / "s")) == 0
    assert _sizes(tmp_path / "s") == {(12, 12)}
    with open(tmp_path / "s" / "manifest.json") as f:
        settings = json.load(f)["settings"]
    assert (settings["height"], settings["width"]) == (12, 12)


def test_height_and_width_flags(run_at_12, tmp_path):
    assert _sample(run_at_12, str(tmp_path / "s"), "--height", "8", "--width", "20") == 0
    assert _sizes(tmp_path / "s") == {(20, 8)}
    assert _sample(run_at_12, str(tmp_path / "h"), "--height", "16") == 0  # the other side keeps the default
    assert _sizes(tmp_path / "h") == {(12, 16)}


def test_a_prompts_job_takes_the_same_sizes(run_at_12, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a blue square\n")
    common = ["sample", "--model", run_at_12, "--prompts", str(prompts), "--num", "1", "--steps", "1"]
    assert main(common + ["--out", str(tmp_path / "job")]) == 0
    assert _sizes(tmp_path / "job") == {(12, 12)}
    assert main(common + ["--out", str(tmp_path / "job_wide"), "--width", "16"]) == 0
    assert _sizes(tmp_path / "job_wide") == {(16, 12)}


def test_a_base_folder_samples_at_its_native_size(tiny_sd, tmp_path):
    assert sampling_size(tiny_sd) == (16, 16)  # sample_size 8 latent cells x VAE factor 2
    assert _sample(tiny_sd, str(tmp_path / "s")) == 0
    assert _sizes(tmp_path / "s") == {(16, 16)}


def test_a_pixel_space_base_keeps_its_size(tiny_base_dir):
    """The embedded (pixel-space) base: factor 1, native size = the UNet's sample_size."""
    with open(os.path.join(tiny_base_dir, "unet", "config.json")) as f:
        native = json.load(f)["sample_size"]
    assert sampling_size(tiny_base_dir) == (native, native)
    assert sampling_size(tiny_base_dir, 9, 11) == (9, 11)


@pytest.mark.parametrize("flags, message", [
    (["--height", "13"], "height 13 is not a multiple of the VAE's downsampling factor 2; use a multiple of 2 (e.g. 12)"),
    (["--width", "7"], "width 7 is not a multiple of the VAE's downsampling factor 2"),
])
@pytest.mark.parametrize("job", [False, True], ids=["prompt", "prompts_job"])
def test_a_size_the_vae_cannot_decode_is_one_line_before_any_load(run_at_12, tmp_path, capsys, monkeypatch, flags, message, job):
    def refuse(path):
        raise AssertionError("the model was loaded before the size was checked")

    monkeypatch.setattr(invdiff.model_folders.load, "load_model", refuse)
    out = str(tmp_path / "s")
    if job:
        prompts = tmp_path / "prompts.txt"
        prompts.write_text("a red square\n")
        rc = main(["sample", "--model", run_at_12, "--prompts", str(prompts), "--out", out, *flags])
    else:
        rc = _sample(run_at_12, out, *flags)
    err = [line for line in re.split(r"[\r\n]", capsys.readouterr().err) if line.strip()]
    assert rc == 2 and len(err) == 1 and message in err[0], err
    assert not os.path.exists(out)


def test_sizes_below_one_are_usage_errors(run_at_12, tmp_path, capsys):
    assert _sample(run_at_12, str(tmp_path / "s"), "--height", "0") == 2
    # argparse's own usage error (cli.py caps the flag; its wording of the range is its own)
    assert re.search(r"argument --height: must be .*got 0", capsys.readouterr().err)


def test_help_describes_the_flags_and_their_defaults():
    text = " ".join(build_parser()._subparsers._group_actions[0].choices["sample"].format_help().split())
    assert "--height HEIGHT" in text and "--width WIDTH" in text and "the size the run trained at" in text


def test_python_sampler_takes_a_size(tiny_sd):
    from invdiff.models.sd import LatentDiffusionBase
    from invdiff.sampling import GuidedDenoiser, sample

    base = LatentDiffusionBase.from_pretrained(tiny_sd).freeze()
    ids = base.conditioner.prompt_ids(["a red square"])
    images = sample(GuidedDenoiser(base), ids, [0], steps=1, height=12, width=8, progress=False)
    assert images.shape == (1, 3, 12, 8)
    with pytest.raises(ValueError, match="width 9 is not a multiple"):
        sample(GuidedDenoiser(base), ids, [0], steps=1, width=9, progress=False)
    assert torch.isfinite(images).all()
