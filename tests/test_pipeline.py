"""InvDiffPipeline: a diffusers DiffusionPipeline with the frozen SD parts and G_psi."""
import os

import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

from invdiff.models.guidance import GuidanceModule
from invdiff.models.sd import LatentDiffusionBase
from invdiff.pipeline import InvDiffPipeline
from tests.utils import assert_pickled_weights_refused, file_modes, make_tiny_sd_folder, umask_modes, using_umask


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    folder = make_tiny_sd_folder(str(tmp_path_factory.mktemp("pipe_sd") / "sd"))
    base = LatentDiffusionBase.from_pretrained(folder)
    torch.manual_seed(0)
    guidance = GuidanceModule.from_frozen(base.unet.config, preset="small", ratio=0.5)
    for p in guidance.parameters():
        p.data.normal_(0, 0.02)  # a trained-looking G, not the zero init
    return InvDiffPipeline(base.unet, base.vae, base.text_encoder, base.tokenizer,
                           DDIMScheduler.from_config(base.scheduler.config), guidance)


def _images(pipe, **kw):
    return pipe(["a red square", "a blue square"], num_inference_steps=3, guidance_scale=2.0,
                generator=torch.Generator().manual_seed(7), output_type="pt", **kw).images


def test_call_is_the_ordinary_diffusers_call(pipe):
    images = _images(pipe)
    assert images.shape == (2, 3, 16, 16) and images.min() >= 0 and images.max() <= 1
    pil = pipe("a red square", num_inference_steps=2, output_type="pil", generator=torch.Generator().manual_seed(0)).images
    assert len(pil) == 1 and pil[0].size == (16, 16)
    latents = pipe("a red square", num_inference_steps=2, output_type="latent", generator=torch.Generator().manual_seed(0)).images
    assert latents.shape == (1, 4, 8, 8)


def test_guidance_changes_the_images_and_strength_zero_is_the_frozen_model(pipe):
    guided = _images(pipe)
    frozen = _images(pipe, guidance_strength=0.0)
    assert not torch.allclose(guided, frozen)
    pipe_without = InvDiffPipeline(pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer, pipe.scheduler, None)
    torch.testing.assert_close(_images(pipe_without), frozen)


def test_save_and_load_round_trip_gives_the_same_images(pipe, tmp_path):
    pipe.save_pretrained(str(tmp_path / "saved"))
    for part in ("unet", "vae", "text_encoder", "tokenizer", "scheduler", "guidance", "model_index.json", "README.md"):
        assert os.path.exists(tmp_path / "saved" / part), part
    assert any(f.endswith(".safetensors") for f in os.listdir(tmp_path / "saved" / "guidance"))
    assert "InvDiff" in (tmp_path / "saved" / "README.md").read_text()
    loaded = InvDiffPipeline.from_pretrained(str(tmp_path / "saved"))
    assert loaded.guidance.ratio == 0.5
    torch.testing.assert_close(_images(loaded), _images(pipe))


@pytest.mark.parametrize("component", ["unet", "guidance"])
def test_pickled_weights_are_refused_before_torch_load(pipe, tmp_path, monkeypatch, component):
    folder = str(tmp_path / "saved")
    pipe.save_pretrained(folder)
    assert_pickled_weights_refused(lambda: InvDiffPipeline.from_pretrained(folder), os.path.join(folder, component),
                                   "diffusion_pytorch_model.bin", monkeypatch)


def test_saved_pipeline_files_get_the_umask_mode(pipe, tmp_path):
    with using_umask(0o027):
        pipe.save_pretrained(str(tmp_path / "saved"))
    modes = file_modes(str(tmp_path / "saved"))
    assert modes["unet/diffusion_pytorch_model.safetensors"] == modes["text_encoder/model.safetensors"] == 0o640
    assert modes == umask_modes(str(tmp_path / "saved"), 0o027)


def test_scheduler_swap(pipe):
    original = pipe.scheduler
    try:
        pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
        images = _images(pipe)
        assert images.shape == (2, 3, 16, 16) and torch.isfinite(images).all()
    finally:
        pipe.scheduler = original


def test_bad_calls(pipe):
    with pytest.raises(ValueError, match="num_inference_steps"):
        pipe("a red square", num_inference_steps=0)
    with pytest.raises(ValueError, match="multiples of 2"):
        pipe("a red square", num_inference_steps=1, height=15, width=16)


@pytest.mark.parametrize("copied", [True, False], ids=["base_folder_copied", "base_saved"])
def test_a_run_pipeline_folder_keeps_the_base_scheduler(tmp_path, copied):
    """The run's pipeline folder holds the scheduler the base shipped (its class and config), not
    DDIM, whether the base's files are copied (a local folder) or the base is saved (a hub id)."""
    import json

    from diffusers import DDPMScheduler, PNDMScheduler

    from invdiff.pipeline import save_pipeline_folder
    from invdiff.model_folders.load import load_model

    folder = make_tiny_sd_folder(str(tmp_path / "sd"))
    # Stable Diffusion 1.5 ships PNDM with these two fields set.
    PNDMScheduler.from_config(DDPMScheduler.load_config(folder, subfolder="scheduler"), skip_prk_steps=True,
                              steps_offset=1).save_pretrained(os.path.join(folder, "scheduler"))
    with open(os.path.join(folder, "model_index.json")) as f:
        index = json.load(f)
    index["scheduler"] = ["diffusers", "PNDMScheduler"]
    with open(os.path.join(folder, "model_index.json"), "w") as f:
        json.dump(index, f)
    with open(os.path.join(folder, "scheduler", "scheduler_config.json")) as f:
        shipped = json.load(f)
    base = LatentDiffusionBase.from_pretrained(folder)
    if not copied:
        base.meta["source"] = "nobody/a-hub-id"  # nothing on disk to copy from
    run = str(tmp_path / "run")
    save_pipeline_folder(run, base, GuidanceModule.from_frozen(base.unet.config, preset="small"))
    with open(os.path.join(run, "scheduler", "scheduler_config.json")) as f:
        assert json.load(f) == shipped
    with open(os.path.join(run, "model_index.json")) as f:
        assert json.load(f)["scheduler"] == ["diffusers", "PNDMScheduler"]
    pipe = InvDiffPipeline.from_pretrained(run)
    assert type(pipe.scheduler) is PNDMScheduler and pipe.scheduler.config.steps_offset == 1
    assert pipe("a red square", num_inference_steps=2, output_type="pt", generator=torch.Generator().manual_seed(0)).images.shape == (1, 3, 16, 16)
    # `invdiff sample` still reads the training noise schedule from it.
    run_base, _ = load_model(run)
    assert type(run_base.scheduler) is DDPMScheduler
    torch.testing.assert_close(run_base.scheduler.alphas_cumprod, base.scheduler.alphas_cumprod, atol=0, rtol=0)
