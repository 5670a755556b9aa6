"""Phi(y): a learned prompt-embedding conditioner, for datasets without a text encoder.

Each known prompt owns one learned vector; one extra row is the null prompt used for
classifier-free guidance. The embedding is handed to the UNet as `encoder_hidden_states`
(B, 1, D), the Stable Diffusion contract, and, for UNets built with `class_embed_type="identity"`,
also as `class_labels` (B, D), which is how the small attention-free presets are conditioned.
"""
from __future__ import annotations

from typing import List, Sequence

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn


from ..errors import UnknownPromptError  # noqa: F401 (torch-free home; re-exported)


class PromptEmbedding(ModelMixin, ConfigMixin):
    config_name = "config.json"

    @register_to_config
    def __init__(self, prompts: List[str], embedding_dim: int = 64):
        super().__init__()
        if len(set(prompts)) != len(prompts):
            raise ValueError("prompts must be unique")
        self.embedding = nn.Embedding(len(prompts) + 1, embedding_dim)
        nn.init.normal_(self.embedding.weight, std=0.5)
        self._index = {p: i for i, p in enumerate(prompts)}

    @property
    def null_id(self) -> int:
        return len(self.config.prompts)

    def prompt_ids(self, prompts: Sequence[str]) -> torch.Tensor:
        """Prompt strings -> (B,) int64 ids; an unknown prompt is a clear error."""
        missing = [p for p in prompts if p not in self._index]
        if missing:
            known = ", ".join(repr(p) for p in self.config.prompts[:20])
            more = " ..." if len(self.config.prompts) > 20 else ""
            raise UnknownPromptError(
                f"unknown prompt(s) {missing}: this model was trained on {known}{more}"
            )
        return torch.tensor([self._index[p] for p in prompts], dtype=torch.long, device=self.device)

    def forward(self, prompt_ids: torch.Tensor) -> torch.Tensor:
        """(B,) int64 ids (null_id = unconditional) -> (B, 1, D) prompt embeddings."""
        return self.embedding(prompt_ids).unsqueeze(1)
