"""Where a bf16 Stable Diffusion 1.5 load spends memory: RSS and peak RSS (VmHWM) after each part.

    python benchmarks/sd15_load_memory.py SD_FOLDER [bf16|fp16|fp32]

SD_FOLDER: an SD-1.5-shaped folder, e.g. `sd_sized_folder(DIR)` from bench_latent_cache.py
(random weights; memory does not depend on them). Loads the UNet and VAE through
models.sd.load_in_dtype and the text encoder through transformers, as LatentDiffusionBase does,
then the whole base once more after freeing them.
"""
import gc
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def memory() -> str:
    with open("/proc/self/status") as f:
        status = dict(line.split(":", 1) for line in f)
    mb = lambda key: int(status[key].split()[0]) / 1024  # noqa: E731
    return f"rss {mb('VmRSS'):.0f} MB, peak {mb('VmHWM'):.0f} MB"


def main() -> None:
    path, name = sys.argv[1], (sys.argv[2] if len(sys.argv) > 2 else "bf16")
    print("torch imported:", memory(), flush=True)
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    from invdiff.models.sd import DTYPES, LatentDiffusionBase, load_in_dtype

    dtype = DTYPES[name]
    print("libraries imported:", memory(), flush=True)
    unet = load_in_dtype(UNet2DConditionModel, path, "unet", dtype)
    print("unet loaded:", memory(), flush=True)
    vae = load_in_dtype(AutoencoderKL, path, "vae", dtype)
    print("vae loaded:", memory(), flush=True)
    text = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", torch_dtype=dtype, use_safetensors=True)
    print("text encoder loaded (transformers):", memory(), flush=True)
    del unet, vae, text
    gc.collect()
    print("all freed:", memory(), flush=True)
    LatentDiffusionBase.from_pretrained(path, dtype=name).freeze()
    print("LatentDiffusionBase loaded:", memory(), flush=True)


if __name__ == "__main__":
    main()
