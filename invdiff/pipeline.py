"""`InvDiffPipeline`: a diffusers DiffusionPipeline with the frozen Stable Diffusion components and
the trained guidance module G_psi (with its combine ratio r, stored in G's config).

    pipe = InvDiffPipeline.from_pretrained("runs/waterbirds")            # a debias run folder
    pipe = InvDiffPipeline.from_pretrained("runs/waterbirds", base="/new/place/of/sd15")  # its base moved
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    images = pipe("a photo of a landbird", num_inference_steps=25, guidance_scale=7.5,
                  generator=torch.Generator().manual_seed(0)).images

The call is the ordinary diffusers one. At each step the frozen UNet's prediction for the
conditional and unconditional branch is combined with G's (eps_tilde = combine(eps, G; r), moved
by `guidance_strength` s from the frozen model, s = 0, to the trained one, s = 1), then
classifier-free guidance and the scheduler's own `step` follow, so any scheduler works. That loop
is invdiff's own plain guided loop (sampling.sampler.guided_loop, as `sample_unfused`), with the
schedule of `invdiff sample` (sampling.schedule.guided_schedule): DDIM is deterministic in G's
attribute band and stochastic below it, so the pipeline draws the images `invdiff sample` does.

A debias run folder holds G_psi and refers to its frozen base by place and content hash
(models/base_reference.py); `from_pretrained` loads the base from there after checking it. A
--copy-base run folder, or one written by `save_pretrained`, is a whole diffusers pipeline folder.
"""
from __future__ import annotations

import os
from typing import Dict, List, Optional, Union

import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput
from diffusers.image_processor import VaeImageProcessor
from diffusers.utils.torch_utils import randn_tensor

from .config import DEFAULT_GUIDANCE_EVERY
from .models.guidance import GuidanceModule
from .sampling.sampler import GuidedDenoiser, guided_loop
from .sampling.schedule import guided_schedule

MODEL_CARD = """---
library_name: diffusers
tags:
- invdiff
- bias-mitigation
- stable-diffusion
---
# InvDiff pipeline

A frozen Stable Diffusion model with an InvDiff guidance module G_psi (arXiv 2412.08480,
"Invariant Guidance for Bias Mitigation in Diffusion Models"), trained by `invdiff debias`
without bias labels. {base_note}

- combine ratio r: {ratio}
- G_psi: {guidance_kind}

```python
from invdiff.pipeline import InvDiffPipeline
pipe = InvDiffPipeline.from_pretrained("{path}")
image = pipe("a prompt", num_inference_steps=25).images[0]
```
"""


class _FrozenParts:
    """The pipeline's frozen UNet as the guided loop reads a base (models.sd.LatentDiffusionBase):
    its prediction in its own dtype, and the VAE's factor for the latent shape."""

    def __init__(self, unet, vae_factor: int):
        self.unet, self.vae_factor = unet, vae_factor

    def eps_native(self, sample: torch.Tensor, timestep: torch.Tensor, prompt_embeds: torch.Tensor) -> torch.Tensor:
        """sample: (B, C, h, w); timestep: (B,); prompt_embeds: (B, L, D). Returns (B, C, h, w) in the UNet's dtype."""
        dtype = self.unet.dtype
        return self.unet(sample.to(dtype), timestep, prompt_embeds.to(dtype)).sample


def _guidance_kind(guidance) -> str:
    if guidance is None:
        return "none"
    if hasattr(guidance.config, "rank"):
        return f"LoRA adapters (rank {guidance.config.rank}) on the frozen UNet"
    return f"UNet preset {guidance.config.preset!r}"


COPIED_BASE_NOTE = "Only `guidance/` was trained; unet/, vae/, text_encoder/ are the base's."
REFERRED_BASE_NOTE = """Only `guidance/` was trained, and only it is stored here: the frozen
Stable Diffusion base is loaded from {where}, checked first against the content hash recorded in
invdiff_run.json ("base_reference"). If the base moved: `InvDiffPipeline.from_pretrained(path, base=DIR)`."""


def write_model_card(directory: str, guidance, base_note: str = COPIED_BASE_NOTE, final_path: Optional[str] = None) -> None:
    """README.md of a pipeline folder: what it is, its ratio r, its kind of G_psi, and where its
    base is. final_path: where the folder will be when it is written to a staging folder first
    (the card's from_pretrained line names it; None: `directory`)."""
    card = MODEL_CARD.format(
        base_note=base_note,
        ratio=guidance.ratio if guidance is not None else "none (no G_psi)",
        guidance_kind=_guidance_kind(guidance),
        path=os.path.abspath(final_path or directory),
    )
    with open(os.path.join(directory, "README.md"), "w") as f:
        f.write(card)


class InvDiffPipeline(DiffusionPipeline):
    """unet, vae, text_encoder, tokenizer, scheduler: the frozen Stable Diffusion parts;
    guidance: G_psi, a GuidanceModule or a LoraGuidance (None gives the plain frozen model)."""

    model_cpu_offload_seq = "text_encoder->unet->vae"
    _optional_components = ["guidance"]

    def __init__(self, unet, vae, text_encoder, tokenizer, scheduler, guidance=None):
        super().__init__()
        self.register_modules(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler, guidance=guidance)
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)

    @torch.no_grad()
    def encode_prompt(self, prompts: List[str]) -> torch.Tensor:
        """prompts -> (N, L, D) CLIP last hidden states."""
        tokens = self.tokenizer(prompts, padding="max_length", max_length=self.tokenizer.model_max_length, truncation=True, return_tensors="pt")
        return self.text_encoder(tokens.input_ids.to(self.text_encoder.device))[0]

    @torch.no_grad()
    def __call__(
        self,
        prompt: Union[str, List[str]],
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        num_images_per_prompt: int = 1,
        generator: Optional[Union[torch.Generator, List[torch.Generator]]] = None,
        output_type: str = "pil",
        guidance_strength: float = 1.0,
        height: Optional[int] = None,
        width: Optional[int] = None,
        latents: Optional[torch.Tensor] = None,
        return_dict: bool = True,
        eta: float = 0.0,
        eta_below_band: Optional[float] = None,
        guidance_every: int = DEFAULT_GUIDANCE_EVERY,
    ):
        """The ordinary diffusers call. Returns ImagePipelineOutput(images) (PIL list, np array or
        (N, 3, H, W) tensor in [0, 1] by `output_type`; "latent" gives the (N, 4, H/f, W/f) latents).
        generator: one, or a list of N (one per image: image i then depends on generator i only,
        as with `invdiff sample`'s seeds); latents: (N, 4, H/f, W/f) initial noise, unscaled.
        eta: a DDIM scheduler's eta in G's attribute band; eta_below_band: its eta under the band
        (None: stochastic, sampling.STOCHASTIC_BELOW_BAND; as `invdiff sample --eta-below-band`);
        guidance_every: G's body at every k-th step, its output reused between (`--guidance-every`)."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts:
            raise ValueError("give at least one prompt")
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
        prompts = [p for p in prompts for _ in range(num_images_per_prompt)]
        if any(side is not None and side % self.vae_scale_factor for side in (height, width)):
            raise ValueError(f"height and width must be multiples of {self.vae_scale_factor}, got {height}x{width}")
        # The frozen UNet and G as `invdiff sample` runs them, and the schedule it samples with.
        denoiser = GuidedDenoiser(_FrozenParts(self.unet, self.vae_scale_factor), self.guidance, guidance_strength)
        schedule = guided_schedule(denoiser, self.scheduler, eta=eta, eta_below=eta_below_band, height=height, width=width,
                                   guidance_every=guidance_every)
        device = self.unet.device
        cond = self.encode_prompt(prompts)
        uncond = self.encode_prompt([""] * len(prompts)) if guidance_scale != 1.0 else None
        if latents is None:
            latents = randn_tensor((len(prompts), *schedule.shape), generator=generator, device=device, dtype=torch.float32)
        with self.progress_bar(total=num_inference_steps) as bar:
            latents = guided_loop(denoiser, self.scheduler, schedule, num_inference_steps, latents.to(device, torch.float32),
                                  cond, uncond, guidance_scale, generator, on_step=bar.update)
        if output_type == "latent":
            images = latents
        else:
            decoded = self.vae.decode(latents.to(self.vae.dtype) / self.vae.config.scaling_factor).sample.float()
            images = self.image_processor.postprocess(decoded, output_type=output_type)
        self.maybe_free_model_hooks()
        return ImagePipelineOutput(images=images) if return_dict else (images,)

    def save_pretrained(self, save_directory: str, **kwargs) -> None:
        """diffusers layout with safetensors, plus a model card (README.md). The UNet is saved
        without the adapters of a LoRA G_psi (they are in guidance/)."""
        import shutil

        from .io import apply_umask
        from .models.lora import LoraGuidance, save_frozen_unet

        kwargs.setdefault("safe_serialization", True)
        super().save_pretrained(save_directory, **kwargs)
        if isinstance(self.guidance, LoraGuidance):
            # diffusers saved the UNet as it is in memory, G's adapters inside it (peft's names):
            # not a plain UNet. Written again as the frozen weights alone.
            shutil.rmtree(os.path.join(save_directory, "unet"))
            save_frozen_unet(self.unet, os.path.join(save_directory, "unet"))
        for name in self.components:  # safetensors writes its files 0600
            if os.path.isdir(os.path.join(save_directory, name)):
                apply_umask(os.path.join(save_directory, name))
        write_model_card(save_directory, self.guidance)

    @classmethod
    def from_pretrained(cls, path: str, base: Optional[str] = None, **kwargs):
        """The frozen components through DiffusionPipeline.from_pretrained, safetensors only, then
        G_psi from `guidance/` (diffusers does not know invdiff's classes; a LoRA G attaches its
        adapters to the loaded UNet, so it comes second). Every weights folder is checked first.
        A run folder that refers to its base loads the frozen components from the base, from
        `base` if given (the base moved), once its content hash matches the run's record. A hub id
        loads only where the user allowed downloads (hub.py); else it is "does not exist"."""
        from .errors import CheckpointError
        from .hub import does_not_exist_message, downloads_allowed, looks_like_hub_id
        from .io import require_safetensors
        from .model_folders import SD_WEIGHTED_COMPONENTS
        from .models.base_reference import base_source

        gdir = os.path.join(path, "guidance")
        load_own_guidance = "guidance" not in kwargs and os.path.isdir(gdir)
        source, revision = base_source(path, base)  # a run folder that refers to its base: that base, checked
        if revision is not None:
            kwargs["revision"] = revision
        if not os.path.exists(source) and not (looks_like_hub_id(source) and downloads_allowed()):
            raise CheckpointError(does_not_exist_message(source, "pipeline folder"))
        # Nothing may retry over the network unless the user allowed downloads.
        kwargs.setdefault("local_files_only", not downloads_allowed())
        for component in SD_WEIGHTED_COMPONENTS:
            if os.path.isdir(os.path.join(source, component)):  # else a hub id, or diffusers names what is missing
                require_safetensors(os.path.join(source, component), f"the pipeline's {component}")
        if load_own_guidance:
            require_safetensors(gdir, "G_psi")
        kwargs.setdefault("use_safetensors", True)
        kwargs.setdefault("guidance", None)
        pipe = super().from_pretrained(source, **kwargs)
        if load_own_guidance:
            from .models.lora import load_guidance

            pipe.register_modules(guidance=load_guidance(gdir, pipe.unet).to(pipe.unet.device))
        return pipe


def save_pipeline_folder(directory: str, base, guidance: Optional[GuidanceModule], final_path: Optional[str] = None) -> None:
    """Write an InvDiffPipeline folder for a LatentDiffusionBase and G_psi. The frozen components
    are copied byte for byte from the base's own folder when it has one (so a bf16-loaded base
    is not saved in bf16), else saved. The scheduler is the base's own, as it shipped (its class
    and config): the pipeline samples with it unless the caller swaps it, and `invdiff sample`
    builds its --scheduler from the noise schedule in that config. final_path: see write_model_card."""
    import json
    import shutil

    from .io import atomic_write_json

    source = base.meta.get("source", "")
    os.makedirs(directory, exist_ok=True)
    if os.path.isdir(source):
        for part in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
            shutil.copytree(os.path.join(source, part), os.path.join(directory, part), dirs_exist_ok=True)
        with open(os.path.join(source, "model_index.json")) as f:
            index = json.load(f)
    else:
        base.save_pretrained(directory)
        with open(os.path.join(directory, "model_index.json")) as f:
            index = json.load(f)
    index.update(_class_name="InvDiffPipeline")
    if guidance is not None:
        guidance.save_pretrained(os.path.join(directory, "guidance"))
        index["guidance"] = ["invdiff", type(guidance).__name__]
    atomic_write_json(os.path.join(directory, "model_index.json"), index)
    write_model_card(directory, guidance, final_path=final_path)


def save_referring_folder(directory: str, guidance, reference: Dict, final_path: Optional[str] = None) -> None:
    """What a run folder that refers to its base holds of the pipeline: G_psi and the model card.
    The run's invdiff_run.json carries `reference` (models/base_reference.py), which
    InvDiffPipeline.from_pretrained follows to the frozen components. No model_index.json: the
    folder is not a whole diffusers pipeline, and a plain DiffusionPipeline must not half-load it.
    final_path: see write_model_card."""
    os.makedirs(directory, exist_ok=True)
    guidance.save_pretrained(os.path.join(directory, "guidance"))
    where = (repr(reference["path"]) if "path" in reference
             else f"the hub id {reference['hub_id']!r} at commit {reference['revision']}")
    write_model_card(directory, guidance, REFERRED_BASE_NOTE.format(where=where), final_path)
