"""The frozen base wrapper, the guidance module G_psi and the prompt conditioner."""
from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from diffusers import DDPMScheduler, UNet2DConditionModel

from invdiff.io import CheckpointError
from invdiff.models import FrozenBase, GuidanceModule, PromptEmbedding, UnknownPromptError
from invdiff.models.base import base_unet_config, training_target
from invdiff.models.guidance import guidance_unet_config



def _inputs(cfg, batch=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    res, ch, dim = cfg["sample_size"], cfg["in_channels"], cfg["cross_attention_dim"]
    x = torch.randn(batch, ch, res, res, generator=gen)
    t = torch.tensor([10, 900][:batch] + [500] * max(0, batch - 2))
    embeds = torch.randn(batch, 1, dim, generator=gen)
    return x, t, embeds


# ----------------------------------------------------------------------------- G_psi


@pytest.fixture(scope="module")
def frozen_cfg():
    return base_unet_config()


def test_guidance_output_is_zero_at_init(frozen_cfg):
    g_mod = GuidanceModule.from_frozen(frozen_cfg)
    x, t, e = _inputs(frozen_cfg)
    with torch.no_grad():
        g = g_mod(x, t, e, x)
    assert g.shape == x.shape
    assert torch.equal(g, torch.zeros_like(x))
    eps = torch.randn_like(x)
    assert g_mod.ratio == 2.0
    assert torch.equal(g_mod.combine(eps, g), eps)  # residual branch: starts at the frozen model
    # with an interpolating ratio the zero G scales eps by (1 - r): documented, not an identity
    g_half = GuidanceModule.from_frozen(frozen_cfg, preset="tiny", ratio=0.5)
    torch.testing.assert_close(g_half.combine(eps, torch.zeros_like(eps)), 0.5 * eps)


def test_guidance_output_layer_gets_gradients(frozen_cfg):
    # zero output weights, but non-zero features feeding them: training can move G off zero
    g_mod = GuidanceModule.from_frozen(frozen_cfg, preset="tiny")
    x, t, e = _inputs(frozen_cfg)
    out = g_mod(x, t, e, x)
    (out * torch.randn(out.shape, generator=torch.Generator().manual_seed(0))).sum().backward()
    assert float(g_mod.unet.conv_out.weight.grad.abs().sum()) > 0


def test_combine_strength(frozen_cfg):
    gen = torch.Generator().manual_seed(1)
    eps, g = torch.randn(2, 3, 4, 4, generator=gen), torch.randn(2, 3, 4, 4, generator=gen)
    for ratio in (0.5, 2.0):
        mod = GuidanceModule.from_frozen(frozen_cfg, preset="tiny", ratio=ratio)
        assert torch.equal(mod.combine(eps, g, strength=0), eps)
        full = eps + ratio * g if ratio > 1 else ratio * g + (1 - ratio) * eps
        torch.testing.assert_close(mod.combine(eps, g), full)
        torch.testing.assert_close(mod.combine(eps, g, strength=2.0), eps + 2 * (full - eps))


def test_ratio_recorded_in_config_and_survives_save_load(frozen_cfg, tmp_path):
    mod = GuidanceModule.from_frozen(frozen_cfg, preset="tiny", ratio=0.7)
    with torch.no_grad():
        mod.unet.conv_out.bias.fill_(0.25)  # make the output non-trivial
    mod.save_pretrained(str(tmp_path / "g"))
    with open(tmp_path / "g" / "config.json") as f:
        cfg = json.load(f)
    assert cfg["ratio"] == 0.7 and cfg["preset"] == "tiny"
    loaded = GuidanceModule.from_pretrained(str(tmp_path / "g"))
    assert loaded.ratio == 0.7
    x, t, e = _inputs(frozen_cfg)
    with torch.no_grad():
        assert torch.equal(loaded(x, t, e, x), mod(x, t, e, x))
        assert float(loaded(x, t, e, x).abs().max()) > 0


def _forward_flops(fn) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.no_grad():
        fn()
    return counter.get_total_flops()


def test_guidance_is_lightweight(frozen_cfg):
    """DESIGN.md: G_psi costs at most ~10% of the frozen UNet's forward FLOPs."""
    frozen = UNet2DConditionModel(**frozen_cfg)
    x, t, e = _inputs(frozen_cfg)
    f_frozen = _forward_flops(lambda: frozen(x, t, e, class_labels=e[:, 0]))
    f_small = _forward_flops(lambda: GuidanceModule.from_frozen(frozen_cfg, "small")(x, t, e, x))
    f_tiny = _forward_flops(lambda: GuidanceModule.from_frozen(frozen_cfg, "tiny")(x, t, e, x))
    assert 0 < f_small <= 0.10 * f_frozen, (f_small, f_frozen)
    assert f_tiny < f_small


def test_guidance_config_follows_the_frozen_unet(frozen_cfg):
    cfg = guidance_unet_config(frozen_cfg, "small")
    for k in ("sample_size", "in_channels", "out_channels", "cross_attention_dim", "class_embed_type", "time_embedding_dim"):
        assert cfg[k] == frozen_cfg[k], k
    assert cfg["block_out_channels"] == [4, 8, 16]
    other = base_unet_config(resolution=8, channels=1, widths=(8, 16), embedding_dim=32)
    mod = GuidanceModule.from_frozen(other, "small")
    x, t, e = _inputs(other)
    assert mod(x, t, e, x).shape == (2, 1, 8, 8)


def test_guidance_rejects_bad_preset_and_ratio(frozen_cfg):
    with pytest.raises(ValueError, match="unknown G_psi preset 'huge'"):
        GuidanceModule.from_frozen(frozen_cfg, "huge")
    for ratio in (0.0, -1.0):
        with pytest.raises(ValueError, match="ratio r must be > 0"):
            GuidanceModule.from_frozen(frozen_cfg, "tiny", ratio=ratio)


# ----------------------------------------------------------------------------- conditioner


def test_prompt_ids_and_unknown_prompt():
    torch.manual_seed(0)
    cond = PromptEmbedding(prompts=["digit 0", "digit 1", "a cat"], embedding_dim=8)
    assert cond.prompt_ids(["a cat", "digit 0"]).tolist() == [2, 0]
    assert cond.null_id == 3
    with pytest.raises(UnknownPromptError) as info:
        cond.prompt_ids(["digit 1", "digit 42"])
    msg = str(info.value)
    assert "'digit 42'" in msg and "'digit 0'" in msg and "'digit 1'" not in msg.split("trained on")[0]
    assert isinstance(info.value, KeyError)
    out = cond(torch.tensor([0, 3]))
    assert out.shape == (2, 1, 8)


def test_prompt_embedding_rejects_duplicates():
    with pytest.raises(ValueError, match="unique"):
        PromptEmbedding(prompts=["a", "a"])


def test_prompt_embedding_round_trip(tmp_path):
    cond = PromptEmbedding(prompts=["x", "y"], embedding_dim=4)
    cond.save_pretrained(str(tmp_path / "c"))
    loaded = PromptEmbedding.from_pretrained(str(tmp_path / "c"))
    assert loaded.prompt_ids(["y"]).tolist() == [1]
    assert torch.equal(loaded.embedding.weight, cond.embedding.weight)
    with pytest.raises(UnknownPromptError, match="'z'"):
        loaded.prompt_ids(["z"])


# ----------------------------------------------------------------------------- frozen base


def test_training_target():
    sched = DDPMScheduler(num_train_timesteps=1000)
    gen = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 3, 4, 4, generator=gen), torch.randn(2, 3, 4, 4, generator=gen)
    t = torch.tensor([100, 800])
    assert torch.equal(training_target(sched, x0, noise, t), noise)
    v_sched = DDPMScheduler(num_train_timesteps=1000, prediction_type="v_prediction")
    a = v_sched.alphas_cumprod[t].view(-1, 1, 1, 1)
    torch.testing.assert_close(training_target(v_sched, x0, noise, t), a.sqrt() * noise - (1 - a).sqrt() * x0)
    assert torch.equal(training_target(DDPMScheduler(prediction_type="sample"), x0, noise, t), x0)


def test_frozen_base_save_layout(frozen_tiny_base, tiny_base_dir):
    for part in ("unet", "conditioner", "scheduler"):
        assert os.path.isdir(os.path.join(tiny_base_dir, part))
    with open(os.path.join(tiny_base_dir, "invdiff_base.json")) as f:
        meta = json.load(f)
    assert meta["kind"] == "invdiff-base" and meta["train"]["steps"] == 2
    assert frozen_tiny_base.prompts == [f"digit {d}" for d in range(10)]
    assert not any(p.requires_grad for p in frozen_tiny_base.parameters())


def test_frozen_base_saves_its_files_with_the_umask_mode(frozen_tiny_base, tmp_path):
    """Not 0600, the mode safetensors gives the files it writes."""
    from tests.utils import file_modes, umask_modes, using_umask

    with using_umask(0o022):
        frozen_tiny_base.save_pretrained(str(tmp_path / "base"))
    modes = file_modes(str(tmp_path / "base"))
    assert modes["unet/diffusion_pytorch_model.safetensors"] == 0o644
    assert modes == umask_modes(str(tmp_path / "base"), 0o022)


def test_frozen_base_round_trip_gives_identical_eps(frozen_tiny_base, tiny_base_dir, tmp_path):
    loaded = FrozenBase.from_pretrained(tiny_base_dir)
    again_dir = str(tmp_path / "again")
    loaded.save_pretrained(again_dir)
    again = FrozenBase.from_pretrained(again_dir).freeze()
    cfg = frozen_tiny_base.unet.config
    x, t, _ = _inputs({"sample_size": cfg.sample_size, "in_channels": cfg.in_channels, "cross_attention_dim": 1}, batch=3)
    pid = torch.tensor([0, 5, frozen_tiny_base.conditioner.null_id])
    with torch.no_grad():
        ref = frozen_tiny_base.eps(x, t, frozen_tiny_base.prompt_embeds(pid))
        for m in (loaded, again):
            assert torch.equal(m.eps(x, t, m.prompt_embeds(pid)), ref)
    assert again.prompts == frozen_tiny_base.prompts
    assert again.meta == frozen_tiny_base.meta
    assert again.scheduler.config.prediction_type == "v_prediction"


def _eps_inputs(base, batch=3):
    cfg = base.unet.config
    x, t, _ = _inputs({"sample_size": cfg.sample_size, "in_channels": cfg.in_channels, "cross_attention_dim": 1}, batch=batch)
    pid = torch.tensor([0, 5, base.conditioner.null_id][:batch])
    return x, t, base.prompt_embeds(pid)


def test_an_fp32_base_eps_is_the_plain_unet_call_bit_for_bit(frozen_tiny_base):
    """eps's casts for a reduced-precision UNet are no-ops for an fp32 one: the demo's results
    depend on the fp32 embedded path staying bit-identical."""
    base = frozen_tiny_base
    x, t, embeds = _eps_inputs(base)
    with torch.no_grad():
        out = base.eps(x, t, embeds)
        plain = base.unet(x, t, embeds, class_labels=embeds[:, 0]).sample
    assert out.dtype == torch.float32
    assert torch.equal(out, plain)


def test_a_bf16_embedded_base_runs_next_to_its_fp32_conditioner(frozen_tiny_base):
    """Issue 14: benchmarks/e2e_models.py puts the UNet in bf16 and leaves the conditioner's table
    in fp32; eps raised "mat1 and mat2 must have the same dtype". eps casts its inputs to the
    UNet's dtype and returns fp32, as LatentDiffusionBase.eps; sampling and a min step run on it."""
    from invdiff import ops
    from invdiff.sampling import GuidedDenoiser, sample

    base = frozen_tiny_base
    x, t, embeds = _eps_inputs(base)
    with torch.no_grad():
        ref = base.eps(x, t, embeds)
    base.unet.to(torch.bfloat16)
    assert base.conditioner(torch.tensor([0])).dtype == torch.float32
    with torch.no_grad():
        out = base.eps(x, t, embeds)
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()
    assert (out - ref).abs().max() <= 0.1 * ref.abs().max()  # bf16 weights: close, not equal

    torch.manual_seed(0)
    g = GuidanceModule.from_frozen(base.unet.config, preset="tiny", ratio=2.0)
    with torch.no_grad():
        eps = base.eps(x, t, embeds)
    gout = g(x, t, embeds, eps)
    weights = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]])
    loss = ops.invariant_loss(eps, torch.randn_like(eps), weights, 1.0, g=gout, ratio=g.ratio)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in g.parameters() if p.requires_grad)

    images = sample(GuidedDenoiser(base, g.eval()), torch.tensor([0, 5]), [0, 1], steps=2, progress=False)
    assert images.shape == (2, *x.shape[1:])
    assert torch.isfinite(images).all()


def test_frozen_base_missing_folder_or_part(tiny_base_dir, tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        FrozenBase.from_pretrained(str(tmp_path / "nowhere"))
    broken = str(tmp_path / "no_unet")
    shutil.copytree(tiny_base_dir, broken)
    shutil.rmtree(os.path.join(broken, "unet"))
    with pytest.raises(CheckpointError, match=r"not an invdiff base model: missing unet/"):
        FrozenBase.from_pretrained(broken)
    no_meta = str(tmp_path / "no_meta")
    shutil.copytree(tiny_base_dir, no_meta)
    os.remove(os.path.join(no_meta, "invdiff_base.json"))
    with pytest.raises(CheckpointError, match="base model metadata not found"):
        FrozenBase.from_pretrained(no_meta)


@pytest.mark.parametrize("component", ["unet", "conditioner"])
def test_frozen_base_with_pickled_weights_is_refused_before_torch_load(tiny_base_dir, tmp_path, monkeypatch, component):
    from tests.utils import assert_pickled_weights_refused

    folder = str(tmp_path / "base")
    shutil.copytree(tiny_base_dir, folder)
    assert_pickled_weights_refused(lambda: FrozenBase.from_pretrained(folder), os.path.join(folder, component),
                                   "diffusion_pytorch_model.bin", monkeypatch)


def test_guidance_with_pickled_weights_is_refused_before_torch_load(frozen_cfg, tmp_path, monkeypatch):
    from invdiff.models.lora import load_guidance
    from tests.utils import assert_pickled_weights_refused

    folder = str(tmp_path / "g")
    GuidanceModule.from_frozen(frozen_cfg, preset="small").save_pretrained(folder)
    assert_pickled_weights_refused(lambda: load_guidance(folder), folder, "diffusion_pytorch_model.bin", monkeypatch)


def test_frozen_base_corrupt_safetensors(tiny_base_dir, tmp_path):
    broken = str(tmp_path / "corrupt")
    shutil.copytree(tiny_base_dir, broken)
    weights = os.path.join(broken, "unet", "diffusion_pytorch_model.safetensors")
    assert os.path.isfile(weights)
    with open(weights, "wb") as f:
        f.write(b"\x08\x00\x00\x00\x00\x00\x00\x00garbage!" + os.urandom(64))
    with pytest.raises(CheckpointError, match=r"could not load the base model") as info:
        FrozenBase.from_pretrained(broken)
    assert "config_name" not in str(info.value)  # failed on the weights, not on something else
