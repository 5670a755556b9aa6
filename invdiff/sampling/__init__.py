"""Sampling, in one place: the sampler, the continuous-batching engine, the step coefficients,
the offline job and the HTTP service.

    spec.py         scheduler kinds and the latent shape of one sample
    step_coeffs.py  per-sample coefficient tables for the fused guided step
    engine.py       SamplingEngine: continuous batching of requests on the device
    sampler.py      GuidedDenoiser, sample (the engine), sample_unfused (the plain loop)
    job.py          `invdiff sample --prompts`: the resumable offline job
    worker.py       the serving engine's worker thread (admission, cancellation, failures)
    engine_process.py  that worker in a process of its own
    service.py      `invdiff serve`: the FastAPI app around a worker
    ray_serve.py    the app as a Ray Serve deployment

Imports run one way (spec, step_coeffs -> engine -> sampler -> job, worker -> engine_process ->
service -> ray_serve), so there is no cycle; tests/test_sampling_imports.py checks it. The names below load their module on first use
(PEP 562), so `import invdiff.sampling.step_coeffs` does not import diffusers' pipelines.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "SCHEDULERS": "spec", "make_scheduler": "spec", "latent_shape": "spec", "check_image_size": "spec",
    "NUM_COEFFS": "step_coeffs", "Col": "step_coeffs", "StepPlan": "step_coeffs", "UnsupportedScheduler": "step_coeffs",
    "plan_steps": "step_coeffs", "guidance_columns": "step_coeffs",
    "Request": "engine", "SamplingEngine": "engine",
    "GuidedDenoiser": "sampler", "sample": "sampler", "sample_unfused": "sampler", "prompts_to_ids": "sampler",
    "below_band_eta": "sampler", "sampling_engine": "sampler", "initial_noise": "sampler", "STOCHASTIC_BELOW_BAND": "sampler",
    "run_sample_job": "job", "read_prompts": "job", "load_samples": "job",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
