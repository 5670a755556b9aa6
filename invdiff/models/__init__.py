from .base import FrozenBase
from .conditioner import PromptEmbedding, UnknownPromptError
from .guidance import GuidanceModule

__all__ = ["FrozenBase", "GuidanceModule", "PromptEmbedding", "UnknownPromptError"]
