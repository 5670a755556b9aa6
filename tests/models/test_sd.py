"""Stable Diffusion class bases in latent space, on a tiny SD folder the tests build themselves
(tiny UNet with cross-attention, tiny AutoencoderKL, tiny CLIP text model + tokenizer)."""
import importlib.util
import json
import os
import shutil

import pytest
import torch

from invdiff.io import CheckpointError
from invdiff.models.guidance import GuidanceModule
from invdiff.models.sd import AttentionBackendError, LatentDiffusionBase, latent_dataset, set_attention
from tests.utils import (
    assert_pickled_weights_refused, file_modes, make_tiny_sd_folder, umask_modes, using_umask, write_tiny_imagefolder,
)


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory):
    return make_tiny_sd_folder(str(tmp_path_factory.mktemp("sd") / "sd"))


@pytest.fixture(scope="session")
def tiny_sd_data(tmp_path_factory):
    return write_tiny_imagefolder(str(tmp_path_factory.mktemp("sd_data") / "data"))


def test_loads_and_runs_in_latent_space(tiny_sd):
    base = LatentDiffusionBase.from_pretrained(tiny_sd)
    assert base.vae_factor == 2 and base.meta["attention"].startswith("sdpa")
    images = torch.rand(3, 3, 16, 16) * 2 - 1
    latents = base.encode_images(images)
    assert latents.shape == (3, 4, 8, 8)
    ids = base.conditioner.prompt_ids(["a red square", "a blue square", "a red square"])
    assert ids.tolist() == [0, 1, 0] and base.conditioner.null_id == 2
    eps = base.eps(latents, torch.tensor([1, 500, 999]), base.prompt_embeds(ids))
    assert eps.shape == latents.shape and eps.dtype == torch.float32
    assert base.decode_latents(latents).shape == (3, 3, 16, 16)


def test_text_encoder_runs_once_per_prompt_set(tiny_sd):
    """The text embeddings are a frozen feature: encoded once, then looked up."""
    base = LatentDiffusionBase.from_pretrained(tiny_sd)
    calls = []
    base.text_encoder.register_forward_hook(lambda *a: calls.append(1))
    ids = base.conditioner.prompt_ids(["a red square", "a blue square"])
    for _ in range(5):
        base.prompt_embeds(ids)
        base.prompt_embeds(torch.full_like(ids, base.conditioner.null_id))
    assert len(calls) == 1
    direct = base.conditioner.encode(["a blue square"])
    torch.testing.assert_close(base.prompt_embeds(ids[1:]), direct)


def test_frozen_parts_in_bf16_give_fp32_predictions(tiny_sd):
    base = LatentDiffusionBase.from_pretrained(tiny_sd, dtype="bf16")
    assert base.unet.dtype == base.vae.dtype == torch.bfloat16
    ids = base.conditioner.prompt_ids(["a red square"])
    eps = base.eps(torch.randn(1, 4, 8, 8), torch.tensor([10]), base.prompt_embeds(ids))
    assert eps.dtype == torch.float32 and torch.isfinite(eps).all()


def test_missing_component_is_a_clear_error(tiny_sd, tmp_path):
    broken = shutil.copytree(tiny_sd, tmp_path / "broken")
    shutil.rmtree(broken / "vae")
    with pytest.raises(CheckpointError, match="missing vae"):
        LatentDiffusionBase.from_pretrained(str(broken))


@pytest.mark.parametrize("component, bin_name", [
    ("unet", "diffusion_pytorch_model.bin"), ("vae", "diffusion_pytorch_model.bin"), ("text_encoder", "pytorch_model.bin"),
])
def test_pickled_weights_are_refused_before_torch_load(tiny_sd, tmp_path, monkeypatch, component, bin_name):
    folder = str(tmp_path / "sd")
    shutil.copytree(tiny_sd, folder)
    assert_pickled_weights_refused(lambda: LatentDiffusionBase.from_pretrained(folder), os.path.join(folder, component),
                                   bin_name, monkeypatch)


def test_saved_base_files_get_the_umask_mode(tiny_sd, tmp_path):
    base = LatentDiffusionBase.from_pretrained(tiny_sd)
    with using_umask(0o022):
        base.save_pretrained(str(tmp_path / "saved"))
    modes = file_modes(str(tmp_path / "saved"))
    assert modes["vae/diffusion_pytorch_model.safetensors"] == modes["text_encoder/model.safetensors"] == 0o644
    assert modes == umask_modes(str(tmp_path / "saved"), 0o022)


def test_cross_attention_width_mismatch_is_a_clear_error(tmp_path):
    folder = make_tiny_sd_folder(str(tmp_path / "mismatch"), text_width=24, cross_attention_dim=32)
    with pytest.raises(CheckpointError, match="hidden size 24 does not match the UNet's cross_attention_dim 32"):
        LatentDiffusionBase.from_pretrained(folder)


def test_resolution_not_divisible_by_the_vae_factor(tiny_sd, tmp_path):
    base = LatentDiffusionBase.from_pretrained(tiny_sd)
    with pytest.raises(ValueError, match="not divisible by the VAE's downsampling factor 2"):
        base.encode_images(torch.zeros(1, 3, 15, 15))


def test_xformers_asked_for(tiny_sd):
    base = LatentDiffusionBase.from_pretrained(tiny_sd)
    if importlib.util.find_spec("xformers") is None:
        with pytest.raises(AttentionBackendError, match="xformers is not installed"):
            set_attention(base.unet, "xformers")
    else:
        assert set_attention(base.unet, "xformers") == "xformers"
    with pytest.raises(ValueError, match="unknown attention backend"):
        set_attention(base.unet, "flash")


def test_latent_cache_on_disk_is_reused_and_invalidated(tiny_sd, tiny_sd_data, tmp_path):
    from invdiff.data import load_dataset

    base = LatentDiffusionBase.from_pretrained(tiny_sd)
    data = load_dataset(tiny_sd_data, "train")
    calls = []
    base.vae.encoder.register_forward_hook(lambda *a: calls.append(1))
    first = latent_dataset(base, data, str(tmp_path / "cache"), progress=False)
    encoded = len(calls)
    again = latent_dataset(base, data, str(tmp_path / "cache"), progress=False)
    assert len(calls) == encoded, "the second load must come from the cache"
    assert isinstance(again.images, torch.Tensor) and torch.equal(first.images, again.images)
    assert first.images.shape == (len(data), 4, 8, 8) and first.prompts == data.prompts
    changed = data.subset(torch.arange(len(data) - 1))  # other images: a stale cache must not be used
    rebuilt = latent_dataset(base, changed, str(tmp_path / "cache"), progress=False)
    assert len(calls) > encoded and rebuilt.images.shape[0] == len(data) - 1


def test_guidance_preset_keeps_cross_attention(tiny_sd):
    base = LatentDiffusionBase.from_pretrained(tiny_sd)
    g = GuidanceModule.from_frozen(base.unet.config, preset="small")
    assert list(g.unet.config.down_block_types) == list(base.unet.config.down_block_types)
    assert g.unet.config.block_out_channels[0] == base.unet.config.block_out_channels[0] // 4
    ids = base.conditioner.prompt_ids(["a red square"])
    x = torch.randn(1, 4, 8, 8)
    out = g(x, torch.tensor([3]), base.prompt_embeds(ids), base.eps(x, torch.tensor([3]), base.prompt_embeds(ids)))
    assert out.shape == x.shape and torch.count_nonzero(out) == 0  # zero-initialised output


def test_full_loop_debias_sample_evaluate_in_latent_space(tiny_sd, tiny_sd_data, tmp_path):
    """The CLI end to end on a Stable Diffusion folder: the run folder is an InvDiffPipeline."""
    from invdiff.cli import main
    from invdiff.pipeline import InvDiffPipeline

    run = str(tmp_path / "run")
    rc = main(["debias", "--base", tiny_sd, "--data", tiny_sd_data, "--out", run, "--steps", "3", "--batch-size", "8",
               "--loss-timesteps", "4", "--max-step-steps", "5", "--latent-cache", str(tmp_path / "cache")])
    assert rc == 0
    for part in ("unet", "vae", "text_encoder", "tokenizer", "scheduler", "guidance", "model_index.json", "README.md",
                 "environments.safetensors", "train_log.json", "invdiff_run.json"):
        assert os.path.exists(os.path.join(run, part)), part
    with open(os.path.join(run, "invdiff_run.json")) as f:
        meta = json.load(f)
    assert meta["attention"].startswith("sdpa")
    with open(os.path.join(run, "model_index.json")) as f:
        assert json.load(f)["guidance"] == ["invdiff", "GuidanceModule"]
    samples = str(tmp_path / "samples")
    assert main(["sample", "--model", run, "--prompt", "a blue square", "--num", "2", "--steps", "3", "--out", samples]) == 0
    assert len(os.listdir(os.path.join(samples, "a_blue_square"))) == 2
    assert main(["evaluate", "--images", samples, "--out", str(tmp_path / "eval.json")]) == 0
    pipe = InvDiffPipeline.from_pretrained(run)
    assert pipe.guidance is not None and pipe.guidance.ratio == 2.0


def test_cli_reports_bad_sd_input_in_one_line(tiny_sd, tmp_path, capsys):
    from invdiff.cli import main

    data = write_tiny_imagefolder(str(tmp_path / "odd"), size=15)
    rc = main(["debias", "--base", tiny_sd, "--data", data, "--out", str(tmp_path / "run"), "--steps", "1"])
    assert rc == 2 and "not divisible by the VAE's downsampling factor" in capsys.readouterr().err
    if importlib.util.find_spec("xformers") is None:
        rc = main(["debias", "--base", tiny_sd, "--data", data, "--out", str(tmp_path / "run2"), "--attention", "xformers"])
        assert rc == 2 and "xformers is not installed" in capsys.readouterr().err


def test_lora_guidance_starts_at_zero_trains_adapters_only_and_round_trips(tiny_sd, tmp_path):
    from invdiff.models.lora import LoraGuidance, load_guidance

    base = LatentDiffusionBase.from_pretrained(tiny_sd).freeze()
    g = LoraGuidance.from_frozen(base.unet, ratio=0.5, rank=2)
    trainable = [n for n, p in g.named_parameters() if p.requires_grad]
    assert trainable and all("lora" in n for n in trainable)
    ids = base.conditioner.prompt_ids(["a red square", "a blue square"])
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([5, 600])
    embeds = base.prompt_embeds(ids)
    eps = base.eps(x, t, embeds)
    assert torch.count_nonzero(g(x, t, embeds, eps)) == 0  # the adapted UNet equals the frozen one at init
    for n, p in g.named_parameters():
        if "lora_B" in n:
            p.data.normal_(0, 0.1)
    out = g(x, t, embeds, eps)
    out.pow(2).mean().backward()
    assert all(p.grad is not None for n, p in g.named_parameters() if p.requires_grad)
    g.save_pretrained(str(tmp_path / "g"))
    loaded = load_guidance(str(tmp_path / "g"))
    assert type(loaded) is LoraGuidance and loaded.ratio == 0.5
    torch.testing.assert_close(loaded(x, t, embeds, eps), out.detach())


def test_debias_with_lora_guidance_gives_a_loadable_pipeline(tiny_sd, tiny_sd_data, tmp_path):
    from invdiff.cli import main
    from invdiff.models.lora import LoraGuidance
    from invdiff.pipeline import InvDiffPipeline

    run = str(tmp_path / "run")
    assert main(["debias", "--base", tiny_sd, "--data", tiny_sd_data, "--out", run, "--steps", "2", "--batch-size", "8",
                 "--loss-timesteps", "4", "--max-step-steps", "5", "--guidance", "lora", "--lora-rank", "2"]) == 0
    pipe = InvDiffPipeline.from_pretrained(run)
    assert isinstance(pipe.guidance, LoraGuidance)
    images = pipe("a red square", num_inference_steps=2, output_type="pt", generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (1, 3, 16, 16)
    assert "LoRA" in open(os.path.join(run, "README.md")).read()


def test_an_unreachable_hub_id_is_a_clear_error(monkeypatch):
    import huggingface_hub.constants

    # What this machine is: nothing can be downloaded. (The env var is read at import time.)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(CheckpointError, match="hub id .* pass a local folder"):
        LatentDiffusionBase.from_pretrained("nobody/no-such-model")
    with pytest.raises(CheckpointError, match="does not exist"):
        LatentDiffusionBase.from_pretrained("./no/such/folder")
