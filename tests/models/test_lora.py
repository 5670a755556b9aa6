"""The LoRA kind of G_psi: adapters on the frozen UNet itself (no copy of it), switched on only in
G's forward; saved as the adapter weights alone, in diffusers' LoRA format (issue 13). On the tiny
SD folder (conftest.tiny_sd)."""
import copy
import json
import os

import pytest
import torch
from diffusers import DDIMScheduler, UNet2DConditionModel

from invdiff.models.lora import ADAPTER_NAME, LORA_WEIGHTS, LoraGuidance, load_guidance
from invdiff.models.sd import LatentDiffusionBase
from invdiff.pipeline import InvDiffPipeline, save_pipeline_folder
from invdiff.model_folders.load import load_model
from invdiff.sampling import GuidedDenoiser, sample

PROMPTS = ["a red square", "a blue square"]


def _base(tiny_sd):
    return LatentDiffusionBase.from_pretrained(tiny_sd).freeze()


def _trained(g, seed=0):
    """Give the adapters trained-looking weights (B is zero at init, so G would be 0)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in g.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return g


def _inputs(base):
    gen = torch.Generator().manual_seed(1)
    x, t = torch.randn(2, 4, 8, 8, generator=gen), torch.tensor([40, 700])
    return x, t, base.prompt_embeds(base.conditioner.prompt_ids(PROMPTS))


def _nbytes(params):
    return sum(p.numel() * p.element_size() for p in params)


def test_adapters_sit_on_the_frozen_unet_and_g_is_the_merged_unet_minus_the_frozen_one(tiny_sd):
    base = _base(tiny_sd)
    merged = copy.deepcopy(base.unet)  # the frozen UNet as loaded, to merge the adapters into by hand
    x, t, embeds = _inputs(base)
    eps_before = base.eps(x, t, embeds)
    g = _trained(LoraGuidance.from_frozen(base.unet, ratio=0.5, rank=2))
    # One UNet: G's parameters are its adapters alone, and they live inside the frozen UNet.
    assert g.unet is base.unet
    unet_params = {id(p) for p in base.unet.parameters()}
    assert all(id(p) in unet_params for p in g.parameters())
    assert all("lora_" in name for name, _ in g.named_parameters())
    assert _nbytes(g.parameters()) < 0.1 * _nbytes(merged.parameters())
    # The frozen prediction is the UNet with the adapters off, before and after G has run.
    eps = base.eps(x, t, embeds)
    assert torch.equal(eps, eps_before)
    out = g(x, t, embeds, eps)
    assert torch.equal(base.eps(x, t, embeds), eps_before)
    # G = UNet_{theta + LoRA} - eps_theta, with theta + LoRA merged by hand: W + scale * B @ A.
    from peft.tuners.tuners_utils import BaseTunerLayer

    with torch.no_grad():
        for name, layer in base.unet.named_modules():
            if isinstance(layer, BaseTunerLayer):
                delta = layer.lora_B[ADAPTER_NAME].weight @ layer.lora_A[ADAPTER_NAME].weight
                merged.get_submodule(name).weight += layer.scaling[ADAPTER_NAME] * delta
    torch.testing.assert_close(out, merged(x, t, embeds).sample - eps, atol=1e-5, rtol=1e-4)


def test_only_the_adapters_train_and_freezing_the_base_leaves_them_trainable(tiny_sd):
    base = _base(tiny_sd)
    g = _trained(LoraGuidance.from_frozen(base.unet, rank=2))
    base.freeze()  # what the min step does to the base before it collects G's parameters
    assert all(p.requires_grad for p in g.parameters())
    x, t, embeds = _inputs(base)
    g(x, t, embeds, base.eps(x, t, embeds)).pow(2).mean().backward()
    assert all(p.grad is not None for p in g.parameters())
    own = {id(p) for p in g.parameters()}
    assert all(p.grad is None and not p.requires_grad for p in base.parameters() if id(p) not in own)
    g.requires_grad_(False)  # loaded for sampling: a forward must not switch it back on
    g(x, t, embeds, base.eps(x, t, embeds))
    assert not any(p.requires_grad for p in g.parameters())


def test_a_unet_carries_one_g(tiny_sd):
    base = _base(tiny_sd)
    LoraGuidance.from_frozen(base.unet, rank=2)
    with pytest.raises(ValueError, match="already carries LoRA adapters"):
        LoraGuidance.from_frozen(base.unet, rank=2)


def test_saved_g_is_the_adapters_alone_and_reloads_to_the_same_images(tiny_sd, tmp_path):
    base = _base(tiny_sd)
    g = _trained(LoraGuidance.from_frozen(base.unet, ratio=0.5, rank=2, t_min=200, band_start=300)).eval()

    def images(b, guidance):
        ids = b.conditioner.prompt_ids(PROMPTS)
        return sample(GuidedDenoiser(b, guidance), ids, [5, 6], steps=3, guidance_scale=2.0, progress=False)

    before = images(base, g)
    assert not torch.allclose(before, images(base, None))  # G changes the images
    folder = str(tmp_path / "guidance")
    g.save_pretrained(folder)
    assert sorted(os.listdir(folder)) == ["config.json", LORA_WEIGHTS]
    saved_bytes = sum(os.path.getsize(os.path.join(folder, n)) for n in os.listdir(folder))
    assert saved_bytes < 0.1 * _nbytes(base.unet.parameters())
    with open(os.path.join(folder, "config.json")) as f:
        config = json.load(f)
    assert (config["ratio"], config["rank"], config["t_min"], config["band_start"]) == (0.5, 2, 200, 300)
    fresh = _base(tiny_sd)
    loaded = load_guidance(folder, fresh.unet).eval()
    assert (loaded.ratio, loaded.t_min, loaded.config.band_start) == (0.5, 200, 300)
    torch.testing.assert_close(images(fresh, loaded), before, atol=0, rtol=0)

    # As a run folder: through model_folders.load.load_model and the pipeline.
    run = str(tmp_path / "run")
    save_pipeline_folder(run, base, g)
    run_base, run_g = load_model(run)
    assert isinstance(run_g, LoraGuidance) and run_g.unet is run_base.unet
    torch.testing.assert_close(images(run_base, run_g), before, atol=0, rtol=0)
    pipe = InvDiffPipeline.from_pretrained(run)
    assert isinstance(pipe.guidance, LoraGuidance) and pipe.guidance.unet is pipe.unet
    in_memory = InvDiffPipeline(base.unet, base.vae, base.text_encoder, base.tokenizer,
                                DDIMScheduler.from_config(base.scheduler.config), g)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)

    def pipe_images(p):
        return p(PROMPTS, num_inference_steps=3, guidance_scale=2.0, output_type="pt",
                 generator=torch.Generator().manual_seed(3)).images

    torch.testing.assert_close(pipe_images(pipe), pipe_images(in_memory), atol=0, rtol=0)


def test_diffusers_reads_the_saved_adapters(tiny_sd, tmp_path):
    """The file is diffusers' LoRA format: `load_lora_adapter` on a plain UNet gives G + eps."""
    base = _base(tiny_sd)
    g = _trained(LoraGuidance.from_frozen(base.unet, rank=2))
    g.save_pretrained(str(tmp_path / "g"))
    x, t, embeds = _inputs(base)
    eps = base.eps(x, t, embeds)
    plain = UNet2DConditionModel.from_pretrained(tiny_sd, subfolder="unet", use_safetensors=True)
    plain.load_lora_adapter(str(tmp_path / "g"), prefix="unet", weight_name=LORA_WEIGHTS, adapter_name="invdiff_g",
                            use_safetensors=True)
    torch.testing.assert_close(plain(x, t, embeds).sample - eps, g(x, t, embeds, eps), atol=1e-5, rtol=1e-4)


def test_a_g_saved_as_a_whole_unet_copy_still_loads(tiny_sd, tmp_path):
    """The layout LoraGuidance wrote before its adapters moved onto the frozen UNet: a config with
    unet_config, and a whole UNet copy with the adapters inside (peft's adapter name "default")."""
    from peft import LoraConfig
    from safetensors.torch import save_file

    base = _base(tiny_sd)
    old = copy.deepcopy(base.unet)
    old.add_adapter(LoraConfig(r=2, lora_alpha=2, init_lora_weights=True, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in old.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    folder = tmp_path / "old_g"
    folder.mkdir()
    save_file({f"unet.{k}": v.contiguous() for k, v in old.state_dict().items()}, str(folder / "diffusion_pytorch_model.safetensors"))
    (folder / "config.json").write_text(json.dumps({
        "_class_name": "LoraGuidance", "_diffusers_version": "0.42.1", "unet_config": dict(base.unet.config),
        "ratio": 2.0, "rank": 2, "alpha": None, "target_modules": ["to_q", "to_k", "to_v", "to_out.0"], "t_min": 0,
        "band_start": 0}, default=list))
    g = load_guidance(str(folder), base.unet)
    x, t, embeds = _inputs(base)
    eps = base.eps(x, t, embeds)
    torch.testing.assert_close(g(x, t, embeds, eps), old(x, t, embeds).sample - eps, atol=1e-5, rtol=1e-4)


def test_a_base_saved_with_a_g_attached_is_saved_without_the_adapters(tiny_sd, tmp_path):
    """A base with no folder of its own (a hub id) is saved, not copied, into a run's pipeline
    folder: its UNet must be the frozen one, loadable by diffusers, without G's adapters."""
    from safetensors import safe_open

    base = _base(tiny_sd)
    frozen = {k: v.clone() for k, v in base.unet.state_dict().items()}
    g = _trained(LoraGuidance.from_frozen(base.unet, rank=2))
    base.meta["source"] = "nobody/a-hub-id"  # nothing on disk to copy from
    save_pipeline_folder(str(tmp_path / "run"), base, g)
    with safe_open(str(tmp_path / "run" / "unet" / "diffusion_pytorch_model.safetensors"), "pt") as f:
        assert sorted(f.keys()) == sorted(frozen)
        assert all(torch.equal(f.get_tensor(k), frozen[k]) for k in frozen)
    pipe = InvDiffPipeline.from_pretrained(str(tmp_path / "run"))
    assert isinstance(pipe.guidance, LoraGuidance)


def test_a_pipeline_with_a_lora_g_saves_the_frozen_unet_and_reloads_to_the_same_images(tiny_sd, tmp_path):
    from safetensors import safe_open

    base = _base(tiny_sd)
    frozen_keys = set(base.unet.state_dict())
    g = _trained(LoraGuidance.from_frozen(base.unet, ratio=0.5, rank=2)).eval()
    pipe = InvDiffPipeline(base.unet, base.vae, base.text_encoder, base.tokenizer,
                           DDIMScheduler.from_config(base.scheduler.config), g)
    pipe.save_pretrained(str(tmp_path / "saved"))
    with safe_open(str(tmp_path / "saved" / "unet" / "diffusion_pytorch_model.safetensors"), "pt") as f:
        assert set(f.keys()) == frozen_keys
    assert sorted(os.listdir(tmp_path / "saved" / "guidance")) == ["config.json", LORA_WEIGHTS]
    loaded = InvDiffPipeline.from_pretrained(str(tmp_path / "saved"))

    def images(p):
        return p(PROMPTS, num_inference_steps=2, guidance_scale=2.0, output_type="pt",
                 generator=torch.Generator().manual_seed(4)).images

    torch.testing.assert_close(images(loaded), images(pipe), atol=0, rtol=0)
