"""Stable Diffusion class bases in latent space, on a tiny SD folder the tests build themselves
(tiny UNet with cross-attention, tiny AutoencoderKL, tiny CLIP text model + tokenizer)."""
import importlib.util
import json
import math
import os
import shutil

import pytest
import torch

from invdiff.sampling.job import prompt_dirname
from invdiff.io import CheckpointError
from invdiff.models.guidance import GuidanceModule
from invdiff.models.sd import AttentionBackendError, LatentDiffusionBase, latent_dataset, set_attention
from tests.utils import (
    assert_pickled_weights_refused, file_modes, make_tiny_sd_folder, umask_modes, using_umask, write_tiny_imagefolder,
)

# tiny_sd, tiny_sd_data: tests/conftest.py

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


def test_text_encoder_runs_once_per_prompt(tiny_sd):
    """The text embeddings are a frozen feature: each prompt is encoded once, then looked up, and
    a prompt's row does not depend on the prompts registered before it (the service registers
    them one request at a time, `invdiff sample` all at once)."""
    base = LatentDiffusionBase.from_pretrained(tiny_sd)
    calls = []
    base.text_encoder.register_forward_hook(lambda *a: calls.append(1))
    ids = base.conditioner.prompt_ids(["a red square", "a blue square"])
    for _ in range(5):
        base.prompt_embeds(ids)
        base.prompt_embeds(torch.full_like(ids, base.conditioner.null_id))
    assert len(calls) == 3  # two prompts and the null prompt
    new = base.conditioner.prompt_ids(["a green square"])
    base.prompt_embeds(new)
    assert len(calls) == 4  # a new prompt costs one encoder call, not a re-encoding of the table
    direct = base.conditioner.encode(["a blue square"])
    torch.testing.assert_close(base.prompt_embeds(ids[1:]), direct)
    other = LatentDiffusionBase.from_pretrained(tiny_sd)
    alone = other.prompt_embeds(other.conditioner.prompt_ids(["a blue square"]))
    assert torch.equal(alone, base.prompt_embeds(ids[1:]))
    base.conditioner.reset_prompts()
    assert base.conditioner.null_id == 0 and base.conditioner.prompts == []


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


@pytest.fixture()
def decode_log(monkeypatch):
    """Records how many images each ImageFiles.load decoded at once, and makes any use of an
    imagefolder's whole pixel tensor (`dataset.images`) fail."""
    from invdiff.data.imagefolder import ImageFiles, ImageFolderDataset

    sizes = []
    load = ImageFiles.load
    monkeypatch.setattr(ImageFiles, "load", lambda self, rows: (sizes.append(len(rows)), load(self, rows))[1])

    def whole_pixel_tensor(self):
        raise AssertionError("the imagefolder's whole pixel tensor was used")

    monkeypatch.setattr(ImageFolderDataset, "images", property(whole_pixel_tensor, ImageFolderDataset.images.fset))
    return sizes


@pytest.mark.parametrize("cached", [True, False], ids=["latent_cache", "in_memory"])
def test_latents_are_encoded_from_files_a_batch_at_a_time(tiny_sd, tiny_sd_data, tmp_path, cached, request):
    """An SD base never holds the folder as one pixel tensor (3 MB per image at 512): the files
    are decoded `batch_size` at a time, and the latents equal those of the whole tensor encoded at once."""
    from invdiff.data import load_dataset

    base = LatentDiffusionBase.from_pretrained(tiny_sd)
    whole = base.encode_images(load_dataset(tiny_sd_data).images)  # what latent_dataset did before
    sizes = request.getfixturevalue("decode_log")
    data = load_dataset(tiny_sd_data)
    latent = latent_dataset(base, data.training_view(), str(tmp_path / "cache") if cached else None, progress=False, batch_size=3)
    assert sizes and max(sizes) <= 3 and sum(sizes) == len(data)
    torch.testing.assert_close(latent.images, whole, rtol=1e-5, atol=1e-6)
    assert type(latent).__name__ == "DiffusionDataset" and latent.resolution == 8 and latent.info["pixel_resolution"] == 16


def test_latent_cache_is_reused_for_unchanged_files_and_rebuilt_when_one_file_changes(tiny_sd, tiny_sd_data, tmp_path, decode_log):
    from PIL import Image

    from invdiff.data import load_dataset

    folder = str(shutil.copytree(tiny_sd_data, tmp_path / "data"))
    cache = str(tmp_path / "cache")
    base = LatentDiffusionBase.from_pretrained(tiny_sd)
    first = latent_dataset(base, load_dataset(folder), cache, progress=False)
    decoded = len(decode_log)
    again = latent_dataset(base, load_dataset(folder), cache, progress=False)  # a new run: the folder read afresh
    assert len(decode_log) == decoded, "an up-to-date cache is checked from the files' metadata: no image is decoded"
    assert torch.equal(first.images, again.images)
    changed = os.path.join(folder, "red_000.png")
    Image.new("RGB", (16, 16), (0, 255, 0)).save(changed)
    stat = os.stat(changed)  # a later edit: kernel file times are coarse, so this rewrite may keep the old mtime
    os.utime(changed, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    rebuilt = latent_dataset(base, load_dataset(folder), cache, progress=False)
    assert len(decode_log) > decoded
    row = load_dataset(folder).files.names.index("red_000.png")
    others = torch.arange(len(first)) != row
    assert not torch.allclose(rebuilt.images[row], first.images[row])
    torch.testing.assert_close(rebuilt.images[others], first.images[others], rtol=0, atol=0)


def _latent_base_and_data(tiny_sd, tiny_sd_data):
    from invdiff.data import load_dataset

    base = LatentDiffusionBase.from_pretrained(tiny_sd).freeze()
    data = load_dataset(tiny_sd_data).training_view()
    base.conditioner.add_prompts(data.prompts)
    return base, latent_dataset(base, data, progress=False)


def test_the_bank_of_a_latent_base_is_fp16_memory_mapped_and_equals_the_fp32_bank(tiny_sd, tiny_sd_data, tmp_path):
    import gc

    from invdiff.environments import BANK_DTYPE, collect_losses

    base, latent = _latent_base_and_data(tiny_sd, tiny_sd_data)
    losses, grid, in_ram = collect_losses(base, latent, 4, 2, progress=False, return_bank=True)
    losses_disk, grid_disk, on_disk = collect_losses(base, latent, 4, 2, progress=False, return_bank=True, bank_dir=str(tmp_path))
    assert torch.equal(losses_disk, losses) and torch.equal(grid_disk, grid)  # the max step does not see where the bank lives
    assert in_ram.pred.dtype == torch.float32 and in_ram.directory is None
    assert BANK_DTYPE == torch.float16 and on_disk.noise.dtype == on_disk.pred.dtype == torch.float16
    assert os.path.dirname(on_disk.directory) == str(tmp_path)
    for name, tensor in (("noise", on_disk.noise), ("pred", on_disk.pred)):
        assert tensor.shape == (len(latent), 8, 4, 8, 8)
        assert tensor.untyped_storage().filename == os.path.join(on_disk.directory, f"{name}.fp16")  # mapped, not in RAM
        fp32 = getattr(in_ram, name)
        # The fp32 bank rounded once to fp16: within half an fp16 ulp, 2**-11 relative.
        assert torch.equal(tensor, fp32.half())
        torch.testing.assert_close(tensor.float(), fp32, rtol=2**-11, atol=2**-25)
    folder = on_disk.directory
    del on_disk
    gc.collect()
    assert not os.path.exists(folder), "the on-disk bank's folder goes with the bank"


def test_debias_with_the_on_disk_bank_trains_like_the_fp32_bank_in_ram(tiny_sd, tiny_sd_data, tmp_path, monkeypatch):
    """`invdiff debias` on an SD base: the bank is fp16 on disk beside the latent cache and the
    imagefolder's pixels are never held whole. Against the same run on the fp32 bank in RAM, every
    step's loss agrees within 2**-11 (the fp16 rounding of one stored value); measured: 6e-5 after 4 steps."""
    import invdiff.debiasing as debiasing
    from invdiff.data import load_dataset
    from invdiff.environments import collect_losses
    from invdiff.config import DebiasConfig
    from invdiff.debiasing import debias

    cache = str(tmp_path / "cache")
    config = DebiasConfig(steps=4, batch_size=8, loss_timesteps=4, max_step_steps=5, latent_cache=cache)
    seen = []
    train_guidance = debiasing.train_guidance

    def recording(base, guidance, dataset, weights, cfg, progress=True, bank=None):
        seen.append((bank.pred.dtype, bank.directory, os.path.isdir(bank.directory or "")))
        return train_guidance(base, guidance, dataset, weights, cfg, progress=progress, bank=bank)

    with monkeypatch.context() as patched:
        patched.setattr(debiasing, "train_guidance", recording)
        from invdiff.data.imagefolder import ImageFolderDataset

        patched.setattr(ImageFolderDataset, "images", property(lambda self: pytest.fail("pixels held whole"), ImageFolderDataset.images.fset))
        on_disk = debias(tiny_sd, load_dataset(tiny_sd_data), str(tmp_path / "disk"), config, progress=False)
    [(dtype, folder, existed)] = seen
    assert dtype == torch.float16 and existed and os.path.dirname(folder) == cache
    assert not os.path.exists(folder), "the bank's folder is removed after the run"

    base, latent = _latent_base_and_data(tiny_sd, tiny_sd_data)
    losses, grid, bank = collect_losses(base, latent, config.loss_timesteps, config.loss_draws, config.seed, progress=False, return_bank=True)
    in_ram = debias(tiny_sd, load_dataset(tiny_sd_data), str(tmp_path / "ram"), config, progress=False,
                    frozen={"losses": losses, "timesteps": grid, "bank": bank})
    disk_losses = [r["loss"] for r in on_disk["log"][:-1]]
    ram_losses = [r["loss"] for r in in_ram["log"][:-1]]
    assert len(disk_losses) == 4 and all(map(math.isfinite, disk_losses))
    torch.testing.assert_close(torch.tensor(disk_losses), torch.tensor(ram_losses), rtol=2**-11, atol=0)
    # G's weights: Adam's first steps are ~lr * sign(gradient), so a parameter whose gradient is
    # ~0 can move by up to 2 lr either way on a rounding difference; the bulk agrees closely
    # (measured: median 1e-6, 99th percentile lr / 40).
    disk_g, ram_g = (_guidance_weights(str(tmp_path / name)) for name in ("disk", "ram"))
    diff = torch.cat([(disk_g[k] - ram_g[k]).abs().flatten() for k in ram_g])
    assert float(diff.median()) < config.lr / 1000 and float(diff.quantile(0.99)) < config.lr / 10


def _guidance_weights(run_dir):
    from safetensors.torch import load_file

    folder = os.path.join(run_dir, "guidance")
    return load_file(os.path.join(folder, next(f for f in os.listdir(folder) if f.endswith(".safetensors"))))


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
    """The CLI end to end on a Stable Diffusion folder: InvDiffPipeline loads the run folder, which
    refers to its base rather than holding a copy (tests/models/test_base_reference.py)."""
    from invdiff.cli import main
    from invdiff.pipeline import InvDiffPipeline

    run = str(tmp_path / "run")
    rc = main(["debias", "--base", tiny_sd, "--data", tiny_sd_data, "--out", run, "--steps", "3", "--batch-size", "8",
               "--loss-timesteps", "4", "--max-step-steps", "5", "--latent-cache", str(tmp_path / "cache")])
    assert rc == 0
    for part in ("guidance", "README.md", "environments.safetensors", "train_log.json", "invdiff_run.json"):
        assert os.path.exists(os.path.join(run, part)), part
    for part in ("unet", "vae", "text_encoder", "tokenizer", "scheduler", "model_index.json"):
        assert not os.path.exists(os.path.join(run, part)), part
    with open(os.path.join(run, "invdiff_run.json")) as f:
        meta = json.load(f)
    assert meta["attention"].startswith("sdpa") and meta["base_reference"]["path"] == os.path.abspath(tiny_sd)
    samples = str(tmp_path / "samples")
    assert main(["sample", "--model", run, "--prompt", "a blue square", "--num", "2", "--steps", "3", "--out", samples]) == 0
    assert len(os.listdir(os.path.join(samples, prompt_dirname("a blue square")))) == 2
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
    with pytest.raises(ValueError, match="pass the frozen UNet they attach to"):
        load_guidance(str(tmp_path / "g"))
    fresh = LatentDiffusionBase.from_pretrained(tiny_sd).freeze()
    loaded = load_guidance(str(tmp_path / "g"), fresh.unet)
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

    import invdiff.hub

    # Offline by default: a hub id is not tried at all unless downloads are allowed (invdiff/hub.py).
    # (An earlier command line in this process may have allowed them: as the library finds it.)
    monkeypatch.setattr(invdiff.hub, "_allowed_by_flag", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with pytest.raises(CheckpointError, match="does not exist; invdiff is offline by default.*--allow-download"):
        LatentDiffusionBase.from_pretrained("nobody/no-such-model")
    with pytest.raises(CheckpointError, match="does not exist$"):
        LatentDiffusionBase.from_pretrained("./no/such/folder")
    # Allowed (HF_HUB_OFFLINE=0), on a machine where nothing can be downloaded: the hub library's
    # own switch, read at import time, stands for that.
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(CheckpointError, match="hub id .* pass a local folder"):
        LatentDiffusionBase.from_pretrained("nobody/no-such-model")


def test_latent_loss_pass_runs_the_unet_at_the_min_step_batch_size(tiny_sd, tiny_sd_data, tmp_path, monkeypatch):
    """The max step's loss pass on a latent base never runs the frozen UNet on more than the
    configured batch: its default of 512 jobs would not fit in memory at SD 1.5 and 512 px."""
    from invdiff.data import load_dataset
    from invdiff.models.sd import LatentDiffusionBase
    from invdiff.config import DebiasConfig
    from invdiff.debiasing import debias

    batches = []
    eps = LatentDiffusionBase.eps

    def recording(self, x_t, t, embeds):
        batches.append(x_t.shape[0])
        return eps(self, x_t, t, embeds)

    monkeypatch.setattr(LatentDiffusionBase, "eps", recording)
    config = DebiasConfig(steps=1, batch_size=6, loss_timesteps=4, loss_draws=1)
    dataset = load_dataset(tiny_sd_data)
    debias(tiny_sd, dataset, str(tmp_path / "run"), config, progress=False)
    assert max(batches) <= 6
    assert sum(batches) >= len(dataset) * 4  # every (sample, t) job of the loss pass ran
