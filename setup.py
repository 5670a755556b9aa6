"""invdiff packaging: the Python package, the Triton kernels of kernels/ (installed as
`invdiff.kernels`), the C++/CUDA extension `invdiff._C` built from csrc/, the shipped assets and
the `invdiff` console script.

The extension is optional. The C++ CPU path is always attempted; the CUDA path is added when
torch is a CUDA build and nvcc is present, or when INVDIFF_FORCE_CUDA=1. A failed or impossible
build is a warning, never an error: invdiff then runs its PyTorch reference path and
`python -m invdiff.info` says why. The build needs torch importable, so install with
`pip install --no-build-isolation -e .` (the Makefile does). What was built is recorded in
invdiff/_build_info.json (torch version, CUDA version, archs, or the reason it was not built).
"""
import json
import os
import sys
import warnings

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))
BUILD_INFO = "_build_info.json"


def _write_build_info(info, package_dirs):
    for directory in package_dirs:
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, BUILD_INFO), "w") as f:
            json.dump(info, f, indent=1, sort_keys=True)


def _extension_setup():
    """(ext_modules, cmdclass) for invdiff._C, or ([], {}) with a warning when it cannot be built."""
    if os.environ.get("INVDIFF_SKIP_EXT") == "1":
        _write_build_info({"built": False, "reason": "INVDIFF_SKIP_EXT=1"}, [os.path.join(HERE, "invdiff")])
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError as err:
        reason = f"torch is not importable at build time ({err}); install torch, then pip install --no-build-isolation"
        warnings.warn(f"invdiff._C will not be built: {reason}")
        _write_build_info({"built": False, "reason": reason}, [os.path.join(HERE, "invdiff")])
        return [], {}

    sources = ["csrc/guided_step.cpp", "csrc/guided_step_cpu.cpp"]
    nvcc = bool(CUDA_HOME) and os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc"))
    force_cuda = os.environ.get("INVDIFF_FORCE_CUDA") == "1"
    with_cuda = force_cuda or (torch.version.cuda is not None and nvcc)
    # -fopenmp: at::parallel_for is an OpenMP pragma in ATen's header; without the flag the CPU
    # step silently runs on one thread.
    cxx_flags, link_flags = ["-O3", "-fopenmp"], ["-fopenmp"]
    if with_cuda:
        extension = CUDAExtension(
            "invdiff._C",
            sources + ["csrc/guided_step_cuda.cu"],
            define_macros=[("WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3"]},
            extra_link_args=link_flags,
        )
    else:
        extension = CppExtension("invdiff._C", sources, extra_compile_args={"cxx": cxx_flags}, extra_link_args=link_flags)
    info = {
        "torch_version": torch.__version__,
        "cuda_version": torch.version.cuda if with_cuda else None,
        "with_cuda": with_cuda,
        "cuda_archs": os.environ.get("TORCH_CUDA_ARCH_LIST", "torch default (visible GPUs, else all)") if with_cuda else None,
        "python": sys.version.split()[0],
    }
    if not with_cuda:
        info["no_cuda_reason"] = (
            "torch is a CPU build" if torch.version.cuda is None else "nvcc not found (set CUDA_HOME or INVDIFF_FORCE_CUDA=1)"
        )

    class OptionalBuildExtension(BuildExtension):
        """BuildExtension whose failure is a warning: the reference path takes over at import."""

        def run(self):
            try:
                super().run()
                info.update(built=True, reason="")
            except Exception as err:  # a missing or broken compiler must not stop the install
                info.update(built=False, reason=f"{type(err).__name__}: {err}")
                warnings.warn(f"invdiff._C was not built ({info['reason']}); invdiff will use its PyTorch reference path")
            targets = [os.path.join(HERE, "invdiff")]
            if not (self.inplace or getattr(self, "editable_mode", False)):
                targets.append(os.path.join(self.build_lib, "invdiff"))
            _write_build_info(info, targets)

    return [extension], {"build_ext": OptionalBuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extension_setup()

setup(
    name="invdiff",
    version="0.1.0",
    description="InvDiff (arXiv 2412.08480): invariant guidance for bias mitigation in diffusion models",
    python_requires=">=3.10",
    packages=find_packages(include=["invdiff", "invdiff.*"]) + ["invdiff.kernels"],
    package_dir={"invdiff.kernels": "kernels"},
    package_data={"invdiff": ["assets/*/*.json", "assets/*/*/*.json", "assets/*/*.safetensors", "assets/*/*/*.safetensors", "assets/*.json", BUILD_INFO]},
    include_package_data=True,
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    install_requires=[
        "torch>=2.1",
        "diffusers>=0.30",
        "transformers>=4.40",  # CLIP text encoders of Stable Diffusion bases
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
        "lora": ["peft>=0.10"],  # the LoRA kind of G_psi
        "xformers": ["xformers"],
        # `invdiff serve`: the engine behind an HTTP service; `--ray`: Ray Serve replicas of it.
        "serve": ["fastapi>=0.110", "uvicorn>=0.29", "prometheus-client>=0.20"],
        "ray": ["ray[serve]>=2.60"],  # 2.60: late-bound ingress (__serve_build_asgi_app__)
        "test": ["pytest", "pytest-benchmark", "hypothesis", "triton>=3.0", "peft>=0.10",
                 "fastapi>=0.110", "uvicorn>=0.29", "prometheus-client>=0.20", "ray[serve]>=2.60", "httpx"],
    },
    entry_points={"console_scripts": ["invdiff=invdiff.cli:main"]},
)
