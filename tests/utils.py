"""Shared test helpers (imported as `tests.utils`)."""
from __future__ import annotations

import contextlib
import os

import numpy as np

import torch

# A small, fixed slice of the colored-digits train split: every 20th image (72 images, all ten
# digits). Kept small so that a 2-step base model trains in well under a second on one thread.
TINY_INDEX_STEP = 20


def tiny_dataset(split: str = "train", p: float = 0.9, step: int = TINY_INDEX_STEP):
    """A small subset of colored digits; `subset` keeps the full prompt list."""
    from invdiff.data import colored_digits

    ds = colored_digits(split, p=p)
    return ds.subset(torch.arange(0, len(ds), step))


TINY_BASE_CONFIG = dict(batch_size=8, widths=(8, 16), embedding_dim=32)


def train_tiny_base(steps: int = 2):
    """A FrozenBase trained for `steps` steps on `tiny_dataset()` (well under a second)."""
    from invdiff.training import BaseTrainConfig, train_base

    return train_base(tiny_dataset(), BaseTrainConfig(steps=steps, **TINY_BASE_CONFIG), progress=False)


def tiny_base(tmp_path, steps: int = 2, base=None) -> str:
    """Train a tiny base model (or take `base`), save it under tmp_path/'base', return the dir."""
    base = train_tiny_base(steps) if base is None else base
    out = os.path.join(str(tmp_path), "base")
    base.save_pretrained(out)
    return out


def max_abs_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().double() - b.detach().double()).abs().max()) if a.numel() else 0.0


def assert_close_to_ref(out: torch.Tensor, ref_fp64: torch.Tensor, same_dtype_ref: torch.Tensor, atol: float = 0.0, name: str = "output") -> None:
    """DESIGN.md's self-adjusting tolerance.

    The fast op's error against the fp64 reference must be at most twice the error that the
    reference itself makes in the fast op's dtype, plus `atol`:
        max|out - ref_fp64| <= 2 * max|same_dtype_ref - ref_fp64| + atol
    """
    assert out.shape == ref_fp64.shape == same_dtype_ref.shape, (
        f"{name}: shapes differ: out {tuple(out.shape)}, fp64 ref {tuple(ref_fp64.shape)}, "
        f"same-dtype ref {tuple(same_dtype_ref.shape)}"
    )
    assert torch.isfinite(out).all(), f"{name}: non-finite values in the fast op's output"
    err = max_abs_err(out, ref_fp64)
    ref_err = max_abs_err(same_dtype_ref, ref_fp64)
    bound = 2.0 * ref_err + atol
    assert err <= bound, (
        f"{name}: error vs fp64 reference {err:.3e} exceeds 2 x same-dtype reference error "
        f"{ref_err:.3e} + atol {atol:.1e} = {bound:.3e}"
    )


def kernel_device() -> torch.device:
    """Where the Triton kernels run in tests: the GPU when there is one, else the CPU under the
    interpreter (tests/conftest.py sets TRITON_INTERPRET=1)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# Extra absolute slack for outputs and gradients, relative to the fp64 reference's magnitude:
# the kernels always accumulate in fp32, in a different order from the reference, so even where
# the same-dtype reference happens to be exact (0 error) a few fp32 ulps must be allowed.
FP32_ACCUMULATION_ATOL = 1e-5


def rounding_atol(dtype: torch.dtype, magnitude: float) -> float:
    """atol for a result stored in `dtype` at about `magnitude`: the fp32 accumulation slack plus
    half an ulp of the storage dtype, the rounding no implementation can avoid. Without the
    latter a bf16 gradient computed exactly in fp32 and rounded once can fail the 2x rule when
    the same-dtype reference's rounding errors happen to be smaller on that draw."""
    return magnitude * (FP32_ACCUMULATION_ATOL + 0.5 * torch.finfo(dtype).eps)


def compare_to_reference(fast_fn, ref_fn, inputs, grad_output=None, name: str = "op") -> None:
    """Run `fast_fn(*inputs)` and `ref_fn` on the same inputs in their own dtype and in fp64, and
    apply `assert_close_to_ref` to the output and to the gradient of every input that requires it.

    inputs: tensors (or non-tensors, passed through). The output must be a single tensor.
    grad_output: the upstream gradient (defaults to ones); given in fp64 and cast per run.
    """

    def prepare(cast):
        prepared = []
        for x in inputs:
            if torch.is_tensor(x):
                y = cast(x.detach())
                prepared.append(y.requires_grad_(x.requires_grad))
            else:
                prepared.append(x)
        return prepared

    def run(fn, args, out_dtype=None):
        out = fn(*args)
        go = torch.ones_like(out, dtype=torch.float64) if grad_output is None else grad_output
        if any(torch.is_tensor(a) and a.requires_grad for a in args):
            out.backward(go.to(out.dtype))
        grads = [a.grad if torch.is_tensor(a) and a.requires_grad else None for a in args]
        return out.detach(), grads

    fast_args, same_args, ref_args = prepare(lambda x: x), prepare(lambda x: x.clone()), prepare(lambda x: x.double())
    out, grads = run(fast_fn, fast_args)
    same_out, same_grads = run(ref_fn, same_args)
    ref_out, ref_grads = run(ref_fn, ref_args)
    scale = max(1.0, float(ref_out.abs().max()))
    assert_close_to_ref(out, ref_out, same_out, atol=rounding_atol(out.dtype, scale), name=f"{name} output")
    for i, (g, sg, rg) in enumerate(zip(grads, same_grads, ref_grads)):
        if rg is None:
            assert g is None, f"{name}: input {i} got a gradient the reference does not give"
            continue
        assert g is not None, f"{name}: input {i} requires grad but the fast op gave none"
        assert g.dtype == fast_args[i].dtype, f"{name}: grad of input {i} is {g.dtype}, not {fast_args[i].dtype}"
        gscale = max(1e-30, float(rg.abs().max()))
        assert_close_to_ref(g, rg, sg, atol=rounding_atol(g.dtype, gscale), name=f"{name} grad of input {i}")


# ----------------------------------------------------------------------------- tiny Stable Diffusion

TINY_SD_TEXT_WIDTH = 32


TINY_CLIP_ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789"


def write_tiny_clip_tokenizer(directory: str, model_max_length: int = 16, alphabet: str = TINY_CLIP_ALPHABET,
                              merges=()):
    """A working CLIP BPE tokenizer with a tiny vocabulary (each character alone and word-final,
    plus the tokens of `merges`, e.g. "a t</w>"), written as the vocab.json + merges.txt files
    CLIPTokenizer reads and saved with save_pretrained. No download. Returns the tokenizer."""
    import json

    from transformers import CLIPTokenizer

    os.makedirs(directory, exist_ok=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for s in alphabet:
        vocab.setdefault(s, len(vocab))
        vocab.setdefault(s + "</w>", len(vocab))
    for merge in merges:
        vocab.setdefault(merge.replace(" ", ""), len(vocab))
    with open(os.path.join(directory, "vocab.json"), "w") as f:
        json.dump(vocab, f)
    with open(os.path.join(directory, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n" + "".join(m + "\n" for m in merges))  # the first line is a header
    tokenizer = CLIPTokenizer(os.path.join(directory, "vocab.json"), os.path.join(directory, "merges.txt"), model_max_length=model_max_length)
    tokenizer.save_pretrained(directory)
    return tokenizer


def make_tiny_sd_folder(directory: str, text_width: int = TINY_SD_TEXT_WIDTH, cross_attention_dim: int = TINY_SD_TEXT_WIDTH,
                        latent_size: int = 8, seed: int = 0) -> str:
    """A tiny but real Stable Diffusion folder (diffusers layout): UNet2DConditionModel with
    cross-attention, AutoencoderKL (factor 2, 4 latent channels), CLIPTextModel from config, a
    CLIP tokenizer, DDPM scheduler, model_index.json. Images are 2 * latent_size pixels."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=latent_size, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_attention_dim, attention_head_dim=2, norm_num_groups=8,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=8,
        sample_size=2 * latent_size,
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=80, hidden_size=text_width, intermediate_size=2 * text_width, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1,
    ))
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="epsilon", clip_sample=False)
    unet.save_pretrained(os.path.join(directory, "unet"))
    vae.save_pretrained(os.path.join(directory, "vae"))
    text_encoder.save_pretrained(os.path.join(directory, "text_encoder"))
    write_tiny_clip_tokenizer(os.path.join(directory, "tokenizer"))
    scheduler.save_pretrained(os.path.join(directory, "scheduler"))
    import json

    with open(os.path.join(directory, "model_index.json"), "w") as f:
        json.dump({
            "_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.42.1",
            "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
            "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
            "scheduler": ["diffusers", "DDPMScheduler"],
        }, f)
    return directory


def write_tiny_imagefolder(directory: str, size: int = 16, per_prompt: int = 8, seed: int = 0) -> str:
    """A biased two-prompt imagefolder: 'a red square' images are mostly red-on-dark with a
    'background' attribute, 'a blue square' mostly blue; metadata.jsonl with an evaluation-only
    attribute column."""
    import json

    from PIL import Image

    rng = np.random.default_rng(seed)
    os.makedirs(directory, exist_ok=True)
    rows = []
    for prompt, colour in (("a red square", (220, 30, 30)), ("a blue square", (30, 30, 220))):
        for i in range(per_prompt):
            background = int(i < per_prompt * 3 // 4)  # 75% of each prompt on the majority background
            arr = np.full((size, size, 3), 200 if background else 40, dtype=np.uint8)
            lo, hi = size // 4, 3 * size // 4
            arr[lo:hi, lo:hi] = colour
            arr = np.clip(arr.astype(int) + rng.integers(-10, 10, arr.shape), 0, 255).astype(np.uint8)
            name = f"{prompt.split()[1]}_{i:03d}.png"
            Image.fromarray(arr).save(os.path.join(directory, name))
            rows.append({"file_name": name, "text": prompt, "background": background})
    with open(os.path.join(directory, "metadata.jsonl"), "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return directory


# ----------------------------------------------------------------------------- pickled weights


def pickle_weights(folder: str, bin_name: str) -> str:
    """Replace the safetensors weights in `folder` by the same tensors saved with torch.save as
    `bin_name` (diffusers reads "diffusion_pytorch_model.bin", transformers "pytorch_model.bin"),
    the unsafe layout older checkpoints ship. Returns the .bin's path."""
    from safetensors.torch import load_file

    (name,) = [n for n in os.listdir(folder) if n.endswith(".safetensors")]
    state = load_file(os.path.join(folder, name))
    os.remove(os.path.join(folder, name))
    path = os.path.join(folder, bin_name)
    torch.save(state, path)
    return path


def assert_pickled_weights_refused(load, folder: str, bin_name: str, monkeypatch) -> None:
    """Pickle the weights in `folder` (see pickle_weights), then check that `load()` raises one
    CheckpointError line naming the .bin, and that torch.load was never called: a loader that
    tried it and had its error wrapped into a CheckpointError would not pass."""
    import pytest

    from invdiff.io import CheckpointError

    unsafe = pickle_weights(folder, bin_name)
    calls = []

    def refusing_load(f, *args, **kwargs):
        calls.append(str(f))
        raise RuntimeError(f"torch.load({f!r}) was called")

    monkeypatch.setattr(torch, "load", refusing_load)
    with pytest.raises(CheckpointError, match=r"not safetensors") as info:
        load()
    assert unsafe in str(info.value) and "\n" not in str(info.value)
    assert calls == [], f"torch.load was called on {calls}"


@contextlib.contextmanager
def using_umask(mask: int):
    """Run the block under the process umask `mask`, then restore the previous one."""
    old = os.umask(mask)
    try:
        yield mask
    finally:
        os.umask(old)


def file_modes(folder: str) -> dict:
    """{path relative to folder: permission bits} of everything below `folder`."""
    import stat

    return {os.path.relpath(os.path.join(root, n), folder): stat.S_IMODE(os.stat(os.path.join(root, n)).st_mode)
            for root, dirs, files in os.walk(folder) for n in dirs + files}


def umask_modes(folder: str, umask: int) -> dict:
    """What `file_modes(folder)` should be when everything was written under `umask`."""
    return {path: (0o777 if os.path.isdir(os.path.join(folder, path)) else 0o666) & ~umask for path in file_modes(folder)}
