"""invdiff: InvDiff (arXiv 2412.08480) bias mitigation for diffusion models, without bias labels."""
__version__ = "0.1.0"
