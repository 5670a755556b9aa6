"""Stable Diffusion class models as the frozen base: UNet + VAE + CLIP text encoder, in latent space.

A diffusers Stable Diffusion folder (unet/, vae/, text_encoder/, tokenizer/, scheduler/,
model_index.json), or a hub id where the user allowed downloads (hub.py), loads as a `LatentDiffusionBase`.
It offers the interface the rest of invdiff uses for the embedded model (`eps`, `prompt_embeds`,
`conditioner.null_id`, `scheduler`, `save_pretrained`), so the max step, the min step and the
samplers run unchanged on latents. What is frozen is computed once and cached:
  - the text embeddings of every prompt (`TextConditioner`'s table), and
  - the VAE latents of the training images (`latent_dataset`, optionally on disk, memory-mapped).
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from ..config import ATTENTION_BACKENDS
from ..hub import does_not_exist_message, downloads_allowed
from ..hub import looks_like_hub_id as reads_as_hub_id
from ..io import CheckpointError, apply_umask, atomic_path, atomic_write_json, require_safetensors
from .base import FrozenBase

from ..model_folders import SD_COMPONENTS, SD_WEIGHTED_COMPONENTS  # noqa: F401 (torch-free home; re-exported)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}  # a torch dtype for each config.FROZEN_DTYPES


from ..errors import AttentionBackendError  # noqa: F401 (torch-free home; re-exported)


from ..model_folders import is_sd_folder, vae_downsampling_factor  # noqa: F401,E402 (torch-free home; re-exported)


def looks_like_hub_id(path: str) -> bool:
    """`path` is a hub id invdiff may load: it reads as one (hub.looks_like_hub_id) and downloads
    are allowed (hub.downloads_allowed). Otherwise False, so that a caller deciding whether
    `path` is a Stable Diffusion base answers that it does not exist."""
    return reads_as_hub_id(path) and downloads_allowed()


def set_attention(unet, backend: str = "sdpa") -> str:
    """Route the UNet's attention through PyTorch SDPA (default) or xformers; returns the name of
    the backend now active. Asking for xformers without it installed is a clear error."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    if backend not in ATTENTION_BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; choose from {list(ATTENTION_BACKENDS)}")
    if not getattr(unet, "attn_processors", None):
        return "none (the UNet has no attention layers)"
    if backend == "xformers":
        try:
            import xformers  # noqa: F401
        except ImportError as exc:
            raise AttentionBackendError(
                "--attention xformers was asked for but xformers is not installed "
                f"({exc}); pip install xformers, or use --attention sdpa (PyTorch's fused attention)"
            ) from exc
        unet.enable_xformers_memory_efficient_attention()
        return "xformers"
    unet.set_attn_processor(AttnProcessor2_0())
    return "sdpa (torch.nn.functional.scaled_dot_product_attention)"


class TextConditioner(torch.nn.Module):
    """CLIP text conditioning with a cached embedding table.

    Prompts get ids in the order they are registered; `null_id` (= the number of prompts) is the
    empty prompt used for classifier-free guidance. The frozen text encoder runs once per prompt:
    `forward(ids)` indexes the table. ids: (B,) int64 -> (B, L, D) with L = tokenizer.model_max_length.
    """

    def __init__(self, text_encoder, tokenizer, prompts: Sequence[str] = ()):
        super().__init__()
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self._prompts: List[str] = []
        self._index: Dict[str, int] = {}
        self._rows: Dict[str, torch.Tensor] = {}  # (L, D) per prompt, "" (the null prompt) included
        self._table: Optional[torch.Tensor] = None
        self.add_prompts(prompts)

    @property
    def prompts(self) -> List[str]:
        return list(self._prompts)

    @property
    def null_id(self) -> int:
        return len(self._prompts)

    def add_prompts(self, prompts: Sequence[str]) -> None:
        new = [p for p in dict.fromkeys(prompts) if p not in self._index]
        if new:
            for p in new:
                self._index[p] = len(self._prompts)
                self._prompts.append(p)
            self._table = None  # rebuilt on next use (the null row moves to the end)

    def reset_prompts(self) -> None:
        """Forget every registered prompt (ids are handed out afresh). A long-running service
        calls this when no sample holds an id, so that its table does not grow without bound."""
        self._prompts, self._index, self._rows, self._table = [], {}, {}, None

    def prompt_ids(self, prompts: Sequence[str]) -> torch.Tensor:
        """Prompt strings -> (B,) int64 ids, registering prompts not seen before."""
        self.add_prompts(prompts)
        return torch.tensor([self._index[p] for p in prompts], dtype=torch.long)

    @torch.no_grad()
    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        """Run the text encoder: texts -> (N, L, D) last hidden states."""
        tokens = self.tokenizer(
            list(texts), padding="max_length", max_length=self.tokenizer.model_max_length, truncation=True, return_tensors="pt"
        )
        device = next(self.text_encoder.parameters()).device
        return self.text_encoder(tokens.input_ids.to(device))[0]

    def table(self) -> torch.Tensor:
        """(P + 1, L, D): the registered prompts' embeddings, then the null prompt's.

        Each prompt is encoded on its own, once: a prompt's row then does not depend on which
        prompts came before it or with it (a batched GEMM may round differently at another batch
        size), so a service that registers prompts one request at a time gives the same images as
        `invdiff sample` with all of them, and a new prompt costs one encoder call, not P."""
        if self._table is None:
            for p in self._prompts + [""]:
                if p not in self._rows:
                    self._rows[p] = self.encode([p])[0]
            self._table = torch.stack([self._rows[p] for p in self._prompts + [""]])
        return self._table

    def forward(self, prompt_ids: torch.Tensor) -> torch.Tensor:
        table = self.table()
        return table[prompt_ids.to(table.device)]


class LatentDiffusionBase(FrozenBase):
    """A frozen Stable Diffusion class model. eps() works on latents: (B, 4, h, w)."""

    def __init__(self, unet, vae, text_encoder, tokenizer, scheduler, meta: Optional[Dict] = None, attention: str = "sdpa"):
        torch.nn.Module.__init__(self)
        check_cross_attention(unet, text_encoder)
        self.unet = unet
        self.vae = vae
        self.conditioner = TextConditioner(text_encoder, tokenizer)
        self.scheduler = scheduler
        self.shipped_scheduler_config: Optional[Dict] = None  # the folder's own scheduler (from_pretrained sets it)
        self.meta = dict(meta or {})
        self.meta["attention"] = set_attention(unet, attention)

    @property
    def prompts(self) -> List[str]:
        return self.conditioner.prompts

    @property
    def text_encoder(self):
        return self.conditioner.text_encoder

    @property
    def tokenizer(self):
        return self.conditioner.tokenizer

    @property
    def vae_factor(self) -> int:
        """Pixels per latent cell along a side: 2 ** (number of VAE down blocks - 1)."""
        return vae_downsampling_factor(self.vae.config)

    @property
    def latent_scale(self) -> float:
        return float(self.vae.config.scaling_factor)

    def eps(self, sample: torch.Tensor, timestep: torch.Tensor, prompt_embeds: torch.Tensor) -> torch.Tensor:
        """The frozen UNet in its own dtype (bf16/fp16 when loaded so); fp32 out for G and the loss."""
        return self.eps_native(sample, timestep, prompt_embeds).float()

    def eps_native(self, sample: torch.Tensor, timestep: torch.Tensor, prompt_embeds: torch.Tensor) -> torch.Tensor:
        """`eps` in the UNet's own dtype, for the sampling engine's fused step (FrozenBase.eps_native)."""
        dtype = self.unet.dtype
        return self.unet(sample.to(dtype), timestep, prompt_embeds.to(dtype)).sample

    def check_resolution(self, resolution: int) -> None:
        if resolution % self.vae_factor:
            raise ValueError(
                f"resolution {resolution} is not divisible by the VAE's downsampling factor {self.vae_factor}; "
                f"use a multiple of {self.vae_factor} (e.g. --resolution {resolution // self.vae_factor * self.vae_factor or self.vae_factor})"
            )

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor, batch_size: int = 32, progress: bool = False) -> torch.Tensor:
        """(N, 3, H, W) in [-1, 1] -> (N, C_latent, H/f, W/f) latents, scaled by the VAE's scaling
        factor. Uses the mean of the VAE posterior: a cached latent must not change between
        epochs, and the posterior's spread is negligible next to the diffusion noise."""
        from tqdm.auto import tqdm

        self.check_resolution(images.shape[-1])
        device, dtype = next(self.vae.parameters()).device, self.vae.dtype
        out = []
        for start in tqdm(range(0, len(images), batch_size), desc="VAE latents", disable=not progress):
            batch = images[start : start + batch_size].to(device, dtype)
            out.append((self.vae.encode(batch).latent_dist.mean * self.latent_scale).float().cpu())
        return torch.cat(out)

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
        """(N, C_latent, h, w) scaled latents -> (N, 3, h*f, w*f) images in [-1, 1]."""
        device, dtype = next(self.vae.parameters()).device, self.vae.dtype
        out = []
        for start in range(0, len(latents), batch_size):
            batch = latents[start : start + batch_size].to(device, dtype) / self.latent_scale
            out.append(self.vae.decode(batch).sample.float().clamp(-1, 1).cpu())
        return torch.cat(out)

    def save_pretrained(self, directory: str) -> None:
        """The diffusers Stable Diffusion layout (safetensors), plus invdiff_base.json. The UNet is
        saved without the adapters a LoRA G_psi attached to it, the scheduler as the base shipped
        it (its class and config) when it was loaded from a folder or hub id."""
        from .base import BASE_META
        from .lora import save_frozen_unet

        os.makedirs(directory, exist_ok=True)
        shipped_scheduler = self.shipped_scheduler_config
        for part in SD_COMPONENTS:
            target = os.path.join(directory, part)
            if part == "unet":
                save_frozen_unet(self.unet, target)
            elif part == "scheduler" and shipped_scheduler:
                os.makedirs(target, exist_ok=True)
                atomic_write_json(os.path.join(target, "scheduler_config.json"), shipped_scheduler)
            else:
                getattr(self, part).save_pretrained(target)
            apply_umask(target)  # safetensors writes its files 0600
        index = {
            "_class_name": "StableDiffusionPipeline",
            "_diffusers_version": __import__("diffusers").__version__,
            "unet": ["diffusers", type(self.unet).__name__],
            "vae": ["diffusers", type(self.vae).__name__],
            "text_encoder": ["transformers", type(self.text_encoder).__name__],
            "tokenizer": ["transformers", type(self.tokenizer).__name__],
            "scheduler": ["diffusers", (shipped_scheduler or {}).get("_class_name") or type(self.scheduler).__name__],
        }
        atomic_write_json(os.path.join(directory, "model_index.json"), index)
        atomic_write_json(os.path.join(directory, BASE_META), {k: v for k, v in self.meta.items() if k != "attention"})

    @classmethod
    def from_pretrained(
        cls, path: str, dtype: str = "fp32", attention: str = "sdpa", device=None, channels_last: bool = False,
        compile_unet: bool = False, revision: Optional[str] = None,
    ) -> "LatentDiffusionBase":
        """Load a Stable Diffusion folder (or hub id, at `revision` if given), or the base a debias
        run folder refers to, checked against its recorded content hash first (base_reference.py).
        dtype: fp32 | bf16 | fp16 for the frozen parts."""
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        from .base import BASE_META
        from .base_reference import base_source

        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; choose from {sorted(DTYPES)}")
        path, revision = base_source(path, revision=revision)  # a run folder: the base it refers to, checked
        local = os.path.isdir(path)
        if local:
            missing = [c for c in SD_COMPONENTS if not os.path.isdir(os.path.join(path, c))]
            if not os.path.isfile(os.path.join(path, "model_index.json")):
                missing.append("model_index.json")
            if missing:
                raise CheckpointError(
                    f"{path!r} is not a complete Stable Diffusion folder: missing {', '.join(missing)} "
                    f"(expected {', '.join(SD_COMPONENTS)} and model_index.json)"
                )
            for component in SD_WEIGHTED_COMPONENTS:
                require_safetensors(os.path.join(path, component), f"the Stable Diffusion {component}")
            # A damaged config is one line naming the file and key, not a diffusers traceback.
            from ..model_folders import read_unet_config, read_vae_factor

            read_unet_config(os.path.join(path, "unet"), need_sample_size=False)
            read_vae_factor(os.path.join(path, "vae"))
        elif not looks_like_hub_id(path):
            raise CheckpointError(does_not_exist_message(path, "base model"))
        torch_dtype = DTYPES[dtype]
        # Nothing may retry over the network unless the user allowed downloads (hub.py).
        offline = not downloads_allowed()
        try:
            unet = load_in_dtype(UNet2DConditionModel, path, "unet", torch_dtype, revision, local_files_only=offline)
            vae = load_in_dtype(AutoencoderKL, path, "vae", torch_dtype, revision, local_files_only=offline)
            text_encoder = CLIPTextModel.from_pretrained(
                path, subfolder="text_encoder", torch_dtype=torch_dtype, use_safetensors=True, revision=revision,
                local_files_only=offline,
            )
            tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", revision=revision, local_files_only=offline)
            # The training noise schedule, whatever sampler the folder ships (often PNDM); the
            # shipped config is kept for saving, so a pipeline folder keeps the base's own sampler.
            shipped_scheduler = dict(DDPMScheduler.load_config(path, subfolder="scheduler", revision=revision,
                                                               local_files_only=offline))
            scheduler = DDPMScheduler.from_config(shipped_scheduler)
        except Exception as exc:  # offline hub id, corrupt weights, wrong classes
            where = "folder" if local else "hub id (no network here? pass a local folder)"
            raise CheckpointError(f"could not load the Stable Diffusion {where} {path!r}: {exc}") from exc
        meta = {}
        if local and os.path.isfile(os.path.join(path, BASE_META)):
            with open(os.path.join(path, BASE_META)) as f:
                meta = json.load(f)
        meta.update(source=os.path.abspath(path) if local else path, kind="stable-diffusion", frozen_dtype=dtype)
        base = cls(unet, vae, text_encoder, tokenizer, scheduler, meta, attention=attention)
        base.shipped_scheduler_config = shipped_scheduler
        if device is not None:
            base.to(device)
        if channels_last:
            base.unet.to(memory_format=torch.channels_last)
        if compile_unet:
            base.unet = torch.compile(base.unet)
        return base


SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                      "BOOL": torch.bool}


def read_safetensors_in_dtype(path: str, dtype: torch.dtype) -> Dict[str, torch.Tensor]:
    """{name: tensor} of a safetensors file, its floating tensors cast to `dtype`, read one tensor
    at a time with plain file reads, so that only one tensor is ever held in the file's dtype.

    Why not safetensors' own loader (and diffusers', which uses it): it memory-maps the file, and
    every fp32 page a cast reads stays resident while the map is open, so a bf16 load peaks at the
    fp32 weights plus the bf16 ones. Measured on a 35M-parameter UNet (133 MB in fp32): peak RSS
    +203 MB through the map, +73 MB this way. At SD-1.5 size that is the UNet's 3.4 GB of fp32 on
    top of its 1.7 GB of bf16, the likely reason a bf16 run peaked higher than an fp32 one (5.57
    against 5.25 GB, issue 13)."""
    import struct
    import sys

    if sys.byteorder != "little":  # safetensors stores little-endian; torch.frombuffer reads native order
        raise ValueError("reading safetensors by hand needs a little-endian machine")
    out = {}
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        (header_size,) = struct.unpack("<Q", f.read(8))
        if header_size > size - 8:  # a damaged file: refuse rather than allocate what it claims
            raise ValueError(f"{path}: the safetensors header runs past the end of the file")
        header = json.loads(f.read(header_size))
        header.pop("__metadata__", None)
        for name, info in header.items():
            stored = SAFETENSORS_DTYPES[info["dtype"]]
            begin, end = info["data_offsets"]
            if not 0 <= begin <= end <= size - 8 - header_size:
                raise ValueError(f"{path}: tensor {name!r} lies outside the file")
            if end == begin:
                tensor = torch.empty(info["shape"], dtype=stored)
            else:
                f.seek(8 + header_size + begin)
                buf = bytearray(end - begin)
                if f.readinto(buf) != len(buf):
                    raise ValueError(f"{path}: tensor {name!r} is cut short")
                tensor = torch.frombuffer(buf, dtype=stored).view(info["shape"])
            out[name] = tensor.to(dtype) if tensor.is_floating_point() else tensor
    return out


def load_in_dtype(model_cls, path: str, subfolder: str, dtype: torch.dtype, revision: Optional[str] = None,
                  local_files_only: bool = True):
    """`model_cls.from_pretrained(path, subfolder=..., torch_dtype=dtype)`, safetensors only, for a
    diffusers model. In a narrower dtype than fp32, a local folder's single weights file is read
    with `read_safetensors_in_dtype` into a model built on the meta device, so the fp32 weights
    are never whole in memory; the result is the same model, bit for bit. Anything this cannot
    load exactly (a hub id, sharded weights, names diffusers renames for old checkpoints, modules
    kept in fp32) goes through diffusers' own loader, from local files only unless `local_files_only`
    is False (the user allowed downloads)."""
    from diffusers.utils import SAFETENSORS_WEIGHTS_NAME

    folder = os.path.join(path, subfolder)
    weights = os.path.join(folder, SAFETENSORS_WEIGHTS_NAME)
    if dtype != torch.float32 and os.path.isfile(weights) and not getattr(model_cls, "_keep_in_fp32_modules", None):
        with torch.device("meta"):
            model = model_cls.from_config(model_cls.load_config(folder))
        try:
            model.load_state_dict(read_safetensors_in_dtype(weights, dtype), strict=True, assign=True)
        except (RuntimeError, KeyError, ValueError, TypeError):
            # An old checkpoint's names, which diffusers' loader renames, or a damaged file, which
            # it reports.
            model = None
        if model is not None and not any(t.is_meta for t in list(model.parameters()) + list(model.buffers())):
            model.register_to_config(_name_or_path=path)
            return model.eval()
    return model_cls.from_pretrained(path, subfolder=subfolder, torch_dtype=dtype, use_safetensors=True, revision=revision,
                                     local_files_only=local_files_only)


def check_cross_attention(unet, text_encoder) -> None:
    width = int(text_encoder.config.hidden_size)
    expected = unet.config.cross_attention_dim
    if isinstance(expected, (list, tuple)):
        expected = expected[0]
    if int(expected) != width:
        raise CheckpointError(
            f"the text encoder's hidden size {width} does not match the UNet's cross_attention_dim {expected}: "
            "the text encoder and UNet come from different models"
        )


# ----------------------------------------------------------------------- the latent cache


def _fingerprint(base: LatentDiffusionBase, dataset) -> str:
    """What the cached latents depend on: the images (sample ids and their content) and the VAE
    (config and dtype: a bf16 VAE gives other latents than an fp32 one). An imagefolder's images
    are known by their files (names, sizes, modification times) and its resize and crop settings,
    so checking the cache decodes no image; other datasets by a sample of their pixels."""
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(dataset.sample_ids.numpy()).tobytes())
    files = getattr(dataset, "files", None)
    if files is not None:
        h.update(files.fingerprint().encode())
    else:
        h.update(np.ascontiguousarray(dataset.images[:: max(1, len(dataset) // 64)].numpy()).tobytes())
        h.update(str(tuple(dataset.images.shape)).encode())
    h.update(json.dumps(dict(base.vae.config), sort_keys=True, default=str).encode())
    h.update(str(base.vae.dtype).encode())
    return h.hexdigest()[:16]


def _encode_in_batches(base: LatentDiffusionBase, dataset, batch_size: int, progress: bool, allocate) -> torch.Tensor:
    """Encode `dataset` `batch_size` rows at a time into `allocate((N, C_latent, h, w))`, a fp32
    tensor: only one batch of pixels is ever in memory."""
    from tqdm.auto import tqdm

    out = None
    for start in tqdm(range(0, len(dataset), batch_size), desc="VAE latents", disable=not progress):
        rows = torch.arange(start, min(start + batch_size, len(dataset)))
        latents = base.encode_images(dataset.load_images(rows), batch_size)
        if out is None:
            out = allocate((len(dataset), *latents.shape[1:]))
        out[rows] = latents
    return out


def latent_dataset(base: LatentDiffusionBase, dataset, cache_dir: Optional[str] = None, progress: bool = True,
                   batch_size: int = 32):
    """The dataset with its images replaced by their VAE latents, encoded once.

    The images go through the VAE `batch_size` at a time (`dataset.load_images`: an imagefolder
    decodes just those files), so the whole set is never in memory as pixels. With `cache_dir`,
    the latents are written straight into cache_dir/latents.npy (+ latents.json with the
    fingerprint of images and VAE) and read back memory-mapped, now and on later runs, so a large
    training set need not fit in RAM. A cache made from other images or another VAE is rebuilt,
    not reused. Returns a DiffusionDataset (N, C_latent, h, w) with the same prompts, ids and attributes.
    """
    base.check_resolution(dataset.resolution)
    fingerprint = _fingerprint(base, dataset)
    latents = None
    if cache_dir:
        os.makedirs(cache_dir, exist_ok=True)
        meta_path, data_path = os.path.join(cache_dir, "latents.json"), os.path.join(cache_dir, "latents.npy")
        if os.path.isfile(meta_path) and os.path.isfile(data_path):
            with open(meta_path) as f:
                if json.load(f).get("fingerprint") == fingerprint:
                    latents = torch.from_numpy(np.load(data_path, mmap_mode="c"))  # copy-on-write map: pages load on use
    if latents is None and cache_dir:
        # A temporary file of this process's own, renamed into place: concurrent writers (ranks
        # under DDP, two runs sharing a cache) never write into one file.
        with atomic_path(data_path) as tmp:
            _encode_in_batches(base, dataset, batch_size, progress, lambda shape: torch.from_numpy(
                np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=shape)))
        latents = torch.from_numpy(np.load(data_path, mmap_mode="c"))  # copy-on-write map: pages load on use
        atomic_write_json(meta_path, {"fingerprint": fingerprint, "shape": list(latents.shape), "scaling_factor": base.latent_scale})
    elif latents is None:
        latents = _encode_in_batches(base, dataset, batch_size, progress, torch.empty)
    info = dict(dataset.info, latent=True, pixel_resolution=dataset.resolution, latent_fingerprint=fingerprint)
    return dataset.with_images(latents, info)
