"""LoRA adapters (peft) on the frozen UNet itself: the second kind of G_psi.

    G_psi(x_t, t, c) = UNet_{theta + LoRA}(x_t, t, c) - eps_theta(x_t, t, c)

The adapters are attached to the frozen UNet in place: there is one UNet in memory, in the frozen
dtype. They are switched off except inside G's forward, so every other caller of that UNet (the
frozen prediction eps_theta, the pipeline's frozen branch, the max step) runs the frozen weights
alone, and G runs the same UNet with them on. The LoRA branch is initialised to zero (peft's
default B = 0), so G starts at 0 like the zero-initialised UNet kind and combine(eps, G; r) starts
at the frozen model; only the adapter weights train, kept in fp32 whatever the frozen dtype. It
fits large text-conditioned UNets, where a fresh narrow UNet would have to learn the text pathway
from scratch while LoRA reuses the frozen one.

Saved: config.json (r, rank, alpha, targets, t_min, band_start) and the adapter weights alone in
diffusers' LoRA format, pytorch_lora_weights.safetensors with keys "unet.<module>.lora_A.weight"
(peft's names), which diffusers' `unet.load_lora_adapter(folder, prefix="unet")` and
`pipe.load_lora_weights(folder)` also read. Loading needs the frozen UNet to attach them to.
"""
from __future__ import annotations

import contextlib
import json
import os
from typing import Dict, Optional, Sequence

import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from diffusers.utils import SAFETENSORS_WEIGHTS_NAME

from ..ops.reference import check_ratio
from .guidance import combine_with_strength, gate_to_band, set_prompt_gains
from .prompt_gains import PromptGains

DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
ADAPTER_NAME = "invdiff"  # the peft adapter name on the frozen UNet
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"  # diffusers' LORA_WEIGHT_NAME_SAFE
LORA_PREFIX = "unet."  # diffusers' key prefix for a UNet's LoRA layers
# A LoraGuidance saved before the adapters moved onto the frozen UNet holds a whole UNet copy
# (SAFETENSORS_WEIGHTS_NAME) with the adapters inside it, under peft's default adapter name.
LEGACY_ADAPTER_NAME = "default"


def _lora_layers(unet):
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in unet.modules() if isinstance(m, BaseTunerLayer)]


def frozen_state_dict(unet) -> Dict[str, torch.Tensor]:
    """The UNet's own weights under their diffusers names, without adapters a LoraGuidance attached
    (peft renames an adapted layer's weight "<layer>.base_layer.weight")."""
    return {k.replace(".base_layer.", "."): v for k, v in unet.state_dict().items() if ".lora_" not in k}


def save_frozen_unet(unet, directory: str) -> None:
    """Save the frozen UNet (diffusers layout, safetensors) without the adapters attached to it."""
    from safetensors.torch import save_file

    from ..io import apply_umask

    unet = getattr(unet, "_orig_mod", unet)  # a torch.compile'd UNet: its module
    if not _lora_layers(unet):
        unet.save_pretrained(directory)
    else:
        os.makedirs(directory, exist_ok=True)
        unet.save_config(directory)
        state = {k: v.contiguous() for k, v in frozen_state_dict(unet).items()}
        save_file(state, os.path.join(directory, SAFETENSORS_WEIGHTS_NAME), metadata={"format": "pt"})
    apply_umask(directory)  # safetensors writes its files 0600


class LoraGuidance(ModelMixin, ConfigMixin):
    """G_psi as LoRA adapters on the frozen UNet's attention projections.

    Its parameters are the adapters alone (also reachable inside the UNet); the UNet is held, not
    owned: `to()`, `state_dict()` and `save_pretrained` leave the frozen weights alone."""

    config_name = "config.json"

    @register_to_config
    def __init__(self, ratio: float = 2.0, rank: int = 4, alpha: Optional[float] = None,
                 target_modules: Sequence[str] = DEFAULT_TARGETS, t_min: int = 0, band_start: int = 0,
                 prompt_gains: Optional[Dict] = None):
        super().__init__()
        self.calibrated_gains = PromptGains(prompt_gains)  # identity until the calibration sets them
        if t_min < 0:
            raise ValueError(f"t_min must be >= 0, got {t_min}")
        check_ratio(ratio)
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        self.adapters = torch.nn.ModuleList()  # filled by attach()
        # Plain attributes, not submodules: G must not own (move, save, count) the frozen UNet.
        self.__dict__["_unet"] = None
        self.__dict__["_layers"] = []

    @property
    def unet(self):
        """The frozen UNet this G's adapters are attached to (None before `attach`)."""
        return self.__dict__["_unet"]

    def attach(self, frozen_unet) -> "LoraGuidance":
        """Add this G's adapters to `frozen_unet` in place (no copy): zero-initialised, in fp32,
        switched off outside G's forward. A UNet carries at most one G."""
        from peft import LoraConfig

        unet = getattr(frozen_unet, "_orig_mod", frozen_unet)  # a torch.compile'd UNet: its module
        if self.unet is not None:
            raise ValueError("this LoRA G_psi is already attached to a UNet")
        if _lora_layers(unet):
            raise ValueError("the frozen UNet already carries LoRA adapters (another G_psi?); load the base afresh for this one")
        targets = list(self.config.target_modules)
        names = [name for name, _ in unet.named_modules()]
        present = {n.rsplit(".", 1)[-1] for n in names} | {".".join(n.split(".")[-2:]) for n in names}
        if not any(t in present for t in targets):
            raise ValueError(f"none of the LoRA target modules {targets} exist in this UNet (it has no attention?); "
                             "use the 'unet' kind of G_psi")
        rank = int(self.config.rank)
        unet.add_adapter(LoraConfig(r=rank, lora_alpha=self.config.alpha or rank, init_lora_weights=True,
                                    target_modules=targets), adapter_name=ADAPTER_NAME)
        layers = _lora_layers(unet)
        self.adapters = torch.nn.ModuleList(
            torch.nn.ModuleDict({name: getattr(layer, name) for name in layer.adapter_layer_names}) for layer in layers)
        # fp32 whatever the frozen dtype: these are the weights the optimiser updates. In place, so
        # the UNet's layers hold the same parameters; peft casts its input to them and back.
        self.adapters.float().requires_grad_(True)
        self.__dict__["_unet"], self.__dict__["_layers"] = unet, layers
        self._switch(False)
        return self

    def _switch(self, on: bool) -> None:
        """Adapters on or off. peft's switch also sets their requires_grad; the caller's choice
        (trained in the min step, frozen when loaded for sampling) is put back."""
        flags = [p.requires_grad for p in self.adapters.parameters()]
        for layer in self.__dict__["_layers"]:
            layer.enable_adapters(on)
        for p, flag in zip(self.adapters.parameters(), flags):
            p.requires_grad_(flag)

    @contextlib.contextmanager
    def adapters_on(self):
        """The UNet with this G's adapters on for the block (UNet_{theta + LoRA}), off after it."""
        self._switch(True)
        try:
            yield self.unet
        finally:
            self._switch(False)

    @classmethod
    def from_frozen(cls, frozen_unet, ratio: float = 2.0, rank: int = 4, t_min: int = 0, band_start: int = 0) -> "LoraGuidance":
        """Zero-initialised adapters attached to `frozen_unet` itself."""
        return cls(ratio=ratio, rank=rank, t_min=t_min, band_start=band_start).attach(frozen_unet)

    @property
    def ratio(self) -> float:
        return float(self.config.ratio)

    @property
    def t_min(self) -> int:
        return int(self.config.get("t_min", 0))

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, prompt_embeds: torch.Tensor,
                frozen_output: Optional[torch.Tensor] = None) -> torch.Tensor:
        """sample: (B, C, H, W); timestep: (B,); prompt_embeds: (B, L, D); frozen_output: (B, C, H, W)
        the frozen prediction (required). Returns the adapted UNet's prediction minus it, (B, C, H, W)
        in the wider of the UNet's and frozen_output's dtypes."""
        if frozen_output is None:
            raise ValueError("the LoRA G_psi is a residual on the frozen prediction: pass frozen_output")
        if self.unet is None:
            raise ValueError("this LoRA G_psi is not attached to a UNet: use from_frozen or load_guidance(folder, unet)")
        dtype = self.unet.dtype  # the frozen dtype: inputs from fp32 callers (G, the loss) are cast to it
        with self.adapters_on() as unet:
            out = unet(sample.to(dtype), timestep, prompt_embeds.to(dtype)).sample
        result = torch.promote_types(out.dtype, frozen_output.dtype)
        correction = self.calibrated_gains.apply(out.to(result) - frozen_output.to(result), frozen_output, prompt_embeds, self.ratio,
                                                   timestep)
        return gate_to_band(correction, timestep, self.t_min, self.ratio, frozen_output.to(result))

    def set_prompt_gains(self, record: Optional[Dict]) -> None:
        """Record the calibration's per-prompt gains in G's config and use them from now on."""
        set_prompt_gains(self, record)

    def combine(self, eps: torch.Tensor, g: torch.Tensor, strength: float = 1.0) -> torch.Tensor:
        return combine_with_strength(eps, g, self.ratio, strength)

    def save_pretrained(self, save_directory: str, **kwargs) -> None:
        """config.json and the adapter weights alone (diffusers' LoRA format, safetensors).
        Other keyword arguments (a pipeline's safe_serialization, variant) are accepted and unused."""
        from diffusers import StableDiffusionPipeline
        from peft.utils import get_peft_model_state_dict

        from ..io import apply_umask

        if self.unet is None:
            raise ValueError("this LoRA G_psi is not attached to a UNet: there are no adapter weights to save")
        os.makedirs(save_directory, exist_ok=True)
        self.save_config(save_directory)
        metadata = self.unet.peft_config[ADAPTER_NAME].to_dict()
        StableDiffusionPipeline.save_lora_weights(
            save_directory, unet_lora_layers=get_peft_model_state_dict(self.unet, adapter_name=ADAPTER_NAME),
            weight_name=LORA_WEIGHTS, unet_lora_adapter_metadata=metadata,
        )
        apply_umask(save_directory)  # safetensors writes its files 0600

    @classmethod
    def from_pretrained(cls, folder: str, frozen_unet) -> "LoraGuidance":
        """The G saved in `folder`, its adapters attached to `frozen_unet` (the base it was trained on)."""
        from peft import set_peft_model_state_dict

        from ..io import CheckpointError, require_safetensors

        require_safetensors(folder, "G_psi")
        config = dict(cls.load_config(folder))
        config.pop("unet_config", None)  # written by the legacy layout; the UNet is now the frozen one
        g = cls.from_config(config).attach(frozen_unet)
        state = _adapter_weights(folder)
        expected = set(_peft_names(g.unet))
        if set(state) != expected:
            extra, missing = sorted(set(state) - expected), sorted(expected - set(state))
            raise CheckpointError(f"the LoRA weights in {folder!r} do not fit this UNet: {len(missing)} missing "
                                  f"(e.g. {missing[:2]}), {len(extra)} unexpected (e.g. {extra[:2]})")
        set_peft_model_state_dict(g.unet, state, adapter_name=ADAPTER_NAME)
        return g


def _peft_names(unet):
    from peft.utils import get_peft_model_state_dict

    return get_peft_model_state_dict(unet, adapter_name=ADAPTER_NAME).keys()


def _adapter_weights(folder: str) -> Dict[str, torch.Tensor]:
    """{peft name ("<module>.lora_A.weight"): tensor} of the adapters saved in `folder`, from
    either layout; only the adapter tensors are read from a legacy whole-UNet file."""
    from safetensors import safe_open

    path = os.path.join(folder, LORA_WEIGHTS)
    legacy = not os.path.isfile(path)
    if legacy:
        path = os.path.join(folder, SAFETENSORS_WEIGHTS_NAME)
    state = {}
    with safe_open(path, framework="pt") as f:
        for key in f.keys():
            if not key.startswith(LORA_PREFIX) or ".lora_" not in key:
                continue  # a legacy file's frozen-UNet copy, or another model's LoRA layers
            name = key[len(LORA_PREFIX):]
            if legacy:
                name = name.replace(f".{LEGACY_ADAPTER_NAME}.", ".")
            state[name] = f.get_tensor(key)
    return state


def load_guidance(folder: str, frozen_unet=None):
    """G_psi of either kind from a saved folder (its config names the class). A LoRA G attaches to
    `frozen_unet`, the frozen base's UNet, which it needs."""
    from ..io import require_safetensors
    from .guidance import GuidanceModule

    with open(os.path.join(folder, "config.json")) as f:
        kind = json.load(f).get("_class_name", "GuidanceModule")
    cls = {"GuidanceModule": GuidanceModule, "LoraGuidance": LoraGuidance}.get(kind)
    if cls is None:
        raise ValueError(f"{folder!r} holds a {kind}, not an invdiff G_psi")
    require_safetensors(folder, "G_psi")
    if cls is LoraGuidance:
        if frozen_unet is None:
            raise ValueError(f"{folder!r} holds LoRA adapters: pass the frozen UNet they attach to")
        return LoraGuidance.from_pretrained(folder, frozen_unet)
    return cls.from_pretrained(folder, use_safetensors=True)
