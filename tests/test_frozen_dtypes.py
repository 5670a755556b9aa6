"""A Stable Diffusion base loaded in every --frozen-dtype the CLI offers (fp32, bf16, fp16), with
both kinds of G_psi: the min step, sampling and the pipeline run, and a reduced-precision base
holds no fp32 copy of its frozen parts (issue 13, "Defects"). On the tiny SD folder (conftest.tiny_sd).

fp16 on the CPU: every op these paths use (convolutions, group norm, SDPA, the CLIP text model,
the VAE) has a CPU fp16 kernel in the torch this package pins, so fp16 runs as is; the tests
below are what shows it.
"""
import json
import os

import pytest
import torch

import invdiff.debiasing
from invdiff.cli import build_parser, main
from invdiff.models.lora import LoraGuidance, load_guidance
from invdiff.models.sd import DTYPES, LatentDiffusionBase
from invdiff.pipeline import InvDiffPipeline
from invdiff.sampling import GuidedDenoiser, sample

KINDS = ["unet", "lora"]


FROZEN_DTYPES = ["fp32", "bf16", "fp16"]


def test_these_are_the_dtypes_the_cli_offers():
    assert sorted(FROZEN_DTYPES) == sorted(DTYPES)
    for dtype in FROZEN_DTYPES:
        args = build_parser().parse_args(["debias", "--base", "b", "--out", "o", "--frozen-dtype", dtype])
        assert args.frozen_dtype == dtype


def _debias_args(base, data, out, dtype, kind):
    return ["debias", "--base", base, "--data", data, "--out", out, "--steps", "2", "--batch-size", "8",
            "--loss-timesteps", "2", "--loss-draws", "1", "--frozen-dtype", dtype, "--guidance", kind, "--lora-rank", "2"]


@pytest.fixture(scope="module")
def dtype_run(tiny_sd, tiny_sd_data, tmp_path_factory):
    """run(dtype, kind) -> the folder of a 2-step debias run with that frozen dtype and kind of G
    (made through the CLI on first use)."""
    root = tmp_path_factory.mktemp("dtype_runs")
    made = {}

    def run(dtype, kind):
        if (dtype, kind) not in made:
            out = str(root / f"{dtype}_{kind}")
            assert main(_debias_args(tiny_sd, tiny_sd_data, out, dtype, kind)) == 0
            made[dtype, kind] = out
        return made[dtype, kind]

    return run


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", FROZEN_DTYPES)
def test_min_step_trains_g_on_every_frozen_dtype(dtype_run, dtype, kind):
    """Was: "expected m1 and m2 to have the same dtype ... BFloat16 != float" in the min step
    (the frozen text encoder's embeddings went into the fp32 G as they were)."""
    run = dtype_run(dtype, kind)
    with open(os.path.join(run, "invdiff_run.json")) as f:
        assert json.load(f)["config"]["frozen_dtype"] == dtype
    with open(os.path.join(run, "train_log.json")) as f:
        losses = [row["loss"] for row in json.load(f)["log"] if "loss" in row]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    base = LatentDiffusionBase.from_pretrained(run).freeze()
    g = load_guidance(os.path.join(run, "guidance"), base.unet)
    # Two steps moved G off its zero initialisation, in fp32, whatever the frozen dtype.
    trained = [p for name, p in g.named_parameters() if "conv_out" in name or "lora_B" in name or "head.2" in name]
    assert trained and all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in trained)
    assert any(torch.count_nonzero(p) for p in trained)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", FROZEN_DTYPES)
def test_sampling_on_every_frozen_dtype(dtype_run, dtype, kind):
    """The engine with the base loaded in `dtype` and the run's G: images in [-1, 1], and close
    to the fp32 base's (the same weights, rounded)."""
    run = dtype_run(dtype, kind)

    def images(load_dtype):
        base = LatentDiffusionBase.from_pretrained(run, dtype=load_dtype).freeze()
        g = load_guidance(os.path.join(run, "guidance"), base.unet).eval().requires_grad_(False)
        ids = base.conditioner.prompt_ids(["a red square", "a blue square"])
        return sample(GuidedDenoiser(base, g), ids, [3, 4], steps=2, guidance_scale=2.0, progress=False)

    out = images(dtype)
    assert out.shape == (2, 3, 16, 16) and out.dtype == torch.float32
    assert torch.isfinite(out).all() and out.abs().max() <= 1
    torch.testing.assert_close(out, images("fp32"), atol=0.1, rtol=0)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", FROZEN_DTYPES)
def test_pipeline_on_every_frozen_dtype(dtype_run, dtype, kind):
    run = dtype_run(dtype, kind)
    pipe = InvDiffPipeline.from_pretrained(run, torch_dtype=DTYPES[dtype])
    assert pipe.unet.dtype == pipe.vae.dtype == pipe.text_encoder.dtype == DTYPES[dtype]
    assert isinstance(pipe.guidance, LoraGuidance) == (kind == "lora")
    images = pipe(["a red square", "a blue square"], num_inference_steps=2, guidance_scale=2.0, output_type="pt",
                  generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (2, 3, 16, 16) and torch.isfinite(images).all()


def _held_parameters(base, guidance):
    """{"frozen": [...], "g": [...]} parameters a run holds, each tensor once (a LoRA G's adapters
    sit inside the frozen UNet: they count as G's)."""
    own = {id(p): p for p in guidance.parameters()}
    frozen = {id(p): p for p in base.parameters() if id(p) not in own}
    return {"frozen": list(frozen.values()), "g": list(own.values())}


def _nbytes(params):
    return sum(p.numel() * p.element_size() for p in params)


@pytest.mark.parametrize("kind", KINDS)
def test_a_bf16_run_holds_its_frozen_parts_in_bf16_only(tiny_sd, tiny_sd_data, tmp_path, monkeypatch, kind):
    """What a debias run holds while the min step trains (the base and G that `train_guidance`
    receives): with --frozen-dtype bf16 every frozen parameter is bf16, in half the bytes of the
    fp32 run's, and the only fp32 parameters are G's own, far fewer than the UNet's. A fp32 copy of
    the frozen UNet (LoRA G) would show up as fp32 parameters of G as many as the UNet's."""
    held = {}
    real = invdiff.debiasing.train_guidance

    def spy(base, guidance, *args, **kwargs):
        held[base.meta["frozen_dtype"]] = _held_parameters(base, guidance)
        return real(base, guidance, *args, **kwargs)

    monkeypatch.setattr(invdiff.debiasing, "train_guidance", spy)
    for dtype in ("fp32", "bf16"):
        assert main(_debias_args(tiny_sd, tiny_sd_data, str(tmp_path / dtype), dtype, kind)) == 0
    bf16, fp32 = held["bf16"], held["fp32"]
    assert {p.dtype for p in bf16["frozen"]} == {torch.bfloat16}
    assert {p.dtype for p in bf16["g"]} == {torch.float32}
    assert _nbytes(bf16["frozen"]) * 2 == _nbytes(fp32["frozen"])
    unet_bytes = _nbytes(LatentDiffusionBase.from_pretrained(tiny_sd).unet.parameters())
    assert _nbytes(bf16["g"]) == _nbytes(fp32["g"]) < 0.5 * unet_bytes


@pytest.mark.parametrize("component", ["unet", "vae"])
@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_a_narrow_load_reads_tensor_by_tensor_and_equals_diffusers_load(tiny_sd, monkeypatch, component, dtype):
    """The UNet and VAE in bf16/fp16 never go through safetensors' memory-mapped loader (which keeps
    every fp32 page it casts resident: a bf16 load then peaks at fp32 + bf16, see
    `read_safetensors_in_dtype`), and come out bit for bit as diffusers' own load makes them."""
    import safetensors.torch
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from invdiff.models.sd import load_in_dtype

    cls = {"unet": UNet2DConditionModel, "vae": AutoencoderKL}[component]

    def mapped(*args, **kwargs):
        raise AssertionError("the fp32 weights were memory-mapped whole")

    with monkeypatch.context() as patch:
        patch.setattr(safetensors.torch, "load_file", mapped)
        model = load_in_dtype(cls, tiny_sd, component, DTYPES[dtype])
    reference = cls.from_pretrained(tiny_sd, subfolder=component, torch_dtype=DTYPES[dtype], use_safetensors=True)
    ours, theirs = model.state_dict(), reference.state_dict()
    assert ours.keys() == theirs.keys() and not model.training
    for key in ours:
        assert ours[key].dtype == theirs[key].dtype == DTYPES[dtype] and torch.equal(ours[key], theirs[key]), key
    assert dict(model.config) == dict(reference.config)


def test_a_damaged_weights_file_in_a_narrow_dtype_is_the_usual_clear_error(tiny_sd, tmp_path):
    """The by-hand reader hands a damaged file to diffusers' loader, which names it; it never
    allocates what a garbage header claims."""
    import shutil

    from invdiff.io import CheckpointError

    folder = shutil.copytree(tiny_sd, tmp_path / "sd")
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(b"\xff" * 8 + b"garbage!" * 8)  # a header of 2**64 - 1 bytes
    with pytest.raises(CheckpointError, match="could not load the Stable Diffusion folder"):
        LatentDiffusionBase.from_pretrained(str(folder), dtype="bf16")
    data = bytearray(open(os.path.join(tiny_sd, "unet", "diffusion_pytorch_model.safetensors"), "rb").read())
    weights.write_bytes(bytes(data[: len(data) // 2]))  # cut short: tensors lie past the end
    with pytest.raises(CheckpointError, match="could not load the Stable Diffusion folder"):
        LatentDiffusionBase.from_pretrained(str(folder), dtype="bf16")
