"""invdiff packaging: the Python package, the Triton kernels of kernels/ (installed as
`invdiff.kernels`), the shipped assets and the `invdiff` console script. The C++/CUDA extension
(csrc/) arrives with a later change."""
from setuptools import find_packages, setup

setup(
    name="invdiff",
    version="0.1.0",
    description="InvDiff (arXiv 2412.08480): invariant guidance for bias mitigation in diffusion models",
    python_requires=">=3.10",
    packages=find_packages(include=["invdiff", "invdiff.*"]) + ["invdiff.kernels"],
    package_dir={"invdiff.kernels": "kernels"},
    package_data={"invdiff": ["assets/*/*.json", "assets/*/*/*.json", "assets/*/*.safetensors", "assets/*/*/*.safetensors", "assets/*.json"]},
    include_package_data=True,
    install_requires=[
        "torch>=2.1",
        "diffusers>=0.30",
        "accelerate>=0.30",
        "safetensors",
        "scikit-learn",
        "torchmetrics>=1.0",
        "scipy",
        "matplotlib",
        "pillow",
        "tqdm",
    ],
    extras_require={
        # Triton runs the fused kernels on CUDA, and on the CPU under TRITON_INTERPRET=1 (the tests).
        "triton": ["triton>=3.0"],
        "test": ["pytest", "pytest-benchmark", "hypothesis", "triton>=3.0"],
    },
    entry_points={"console_scripts": ["invdiff=invdiff.cli:main"]},
)
