"""invdiff: InvDiff (arXiv 2412.08480) bias mitigation for diffusion models, without bias labels."""
__version__ = "0.1.0"

# Pipeline folders name their components as (library, class): diffusers looks up
# `invdiff.GuidanceModule` here, and `invdiff.ModelMixin` to learn how to load it. Imported
# lazily so that `import invdiff` stays light.
_LAZY = {
    "GuidanceModule": "invdiff.models.guidance",
    "LoraGuidance": "invdiff.models.lora",
    "InvDiffPipeline": "invdiff.pipeline",
    "ModelMixin": "diffusers",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'invdiff' has no attribute {name!r}")
