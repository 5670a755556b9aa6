"""Min-step step time with and without the frozen-feature cache (VAE latents + text embeddings).

    python benchmarks/bench_latent_cache.py                 # small config, CPU
    python benchmarks/bench_latent_cache.py --sd-sized      # SD 1.5-sized UNet/VAE/CLIP from config (a GPU)

Both providers run the same min step on the same batches (frozen UNet forward, G_psi forward
and backward, the invariant loss, an optimiser step); only where the frozen features come from
differs:
  uncached  every step encodes its batch with the VAE and its prompts with the text encoder,
            as a naive port of the training loop would;
  cached    the latents and the prompt embeddings were computed once (invdiff.models.sd's
            latent_dataset and TextConditioner table) and are looked up.
The models are built from configs with random weights: step time does not depend on the weights.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import write_json  # noqa: E402
from invdiff import ops  # noqa: E402
from invdiff.config import FROZEN_DTYPES  # noqa: E402
from invdiff.models.guidance import GuidanceModule  # noqa: E402
from invdiff.models.sd import LatentDiffusionBase  # noqa: E402


def sd_sized_folder(directory: str) -> str:
    """Stable Diffusion 1.5's UNet, VAE and CLIP ViT-L/14 text encoder shapes, random weights."""
    import json as _json

    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from tests.utils import write_tiny_clip_tokenizer

    UNet2DConditionModel(cross_attention_dim=768, sample_size=64).save_pretrained(os.path.join(directory, "unet"))
    AutoencoderKL(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                  up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, layers_per_block=2,
                  sample_size=512).save_pretrained(os.path.join(directory, "vae"))
    CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                 num_attention_heads=12, max_position_embeddings=77)).save_pretrained(os.path.join(directory, "text_encoder"))
    write_tiny_clip_tokenizer(os.path.join(directory, "tokenizer"), model_max_length=77)
    DDPMScheduler(beta_schedule="scaled_linear").save_pretrained(os.path.join(directory, "scheduler"))
    with open(os.path.join(directory, "model_index.json"), "w") as f:
        _json.dump({"_class_name": "StableDiffusionPipeline"}, f)
    return directory


def small_folder(directory: str) -> str:
    from tests.utils import make_tiny_sd_folder

    return make_tiny_sd_folder(directory, latent_size=16)


def run(base, images, prompts, cached: bool, steps: int, batch: int, device: str):
    gen = torch.Generator().manual_seed(0)
    ids = base.conditioner.prompt_ids(prompts)
    latents = base.encode_images(images) if cached else None
    guidance = GuidanceModule.from_frozen(base.unet.config, preset="small").to(device)
    opt = torch.optim.AdamW(guidance.parameters(), lr=1e-3)
    weights = torch.rand(len(images), 2, generator=gen)
    times = []
    for step in range(steps + 2):  # 2 warm-up steps
        idx = torch.randint(0, len(images), (batch,), generator=gen)
        start = time.perf_counter()
        if cached:
            x0, embeds = latents[idx].to(device), base.prompt_embeds(ids[idx])
        else:
            with torch.no_grad():
                x0 = base.encode_images(images[idx])
                embeds = base.conditioner.encode([prompts[i] for i in idx.tolist()])
            x0 = x0.to(device)
        noise = torch.randn(x0.shape, generator=gen).to(device)
        t = torch.randint(0, 1000, (batch,), generator=gen).to(device)
        x_t = base.scheduler.add_noise(x0, noise, t)
        with torch.no_grad():
            eps = base.eps(x_t, t, embeds)
        g = guidance(x_t, t, embeds.float(), eps)
        loss = ops.invariant_loss(eps, noise, weights[idx].to(device), 1.0, g=g, ratio=2.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if device == "cuda":
            torch.cuda.synchronize()
        if step >= 2:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sd-sized", action="store_true", help="SD 1.5-sized components (for a GPU)")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--dtype", default=None, choices=FROZEN_DTYPES)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = args.dtype or ("bf16" if device == "cuda" else "fp32")
    batch = args.batch or (16 if args.sd_sized else 16)
    with tempfile.TemporaryDirectory() as tmp:
        folder = (sd_sized_folder if args.sd_sized else small_folder)(os.path.join(tmp, "sd"))
        base = LatentDiffusionBase.from_pretrained(folder, dtype=dtype, device=device).freeze()
    pixels = 512 if args.sd_sized else 32
    gen = torch.Generator().manual_seed(1)
    images = torch.rand(args.images, 3, pixels, pixels, generator=gen) * 2 - 1
    prompts = [f"a photo of a {'red' if i % 2 else 'blue'} square" for i in range(args.images)]
    result = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "config": "sd-1.5-sized" if args.sd_sized else "small",
              "batch": batch, "frozen_dtype": dtype, "steps": args.steps}
    for mode in ("uncached", "cached"):
        result[f"{mode}_s_per_step"] = run(base, images, prompts, mode == "cached", args.steps, batch, device)
        print(f"  {mode}: {result[f'{mode}_s_per_step'] * 1e3:.1f} ms/step", file=sys.stderr, flush=True)
    result["speedup"] = result["uncached_s_per_step"] / result["cached_s_per_step"]
    print(f"min step, {result['config']} config, batch {batch}, {dtype} frozen parts, {result['device']}: "
          f"uncached {result['uncached_s_per_step'] * 1e3:.1f} ms/step, cached {result['cached_s_per_step'] * 1e3:.1f} ms/step "
          f"-> {result['speedup']:.2f}x with the cache")
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
