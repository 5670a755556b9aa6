"""Sampling, in one place: the sampler, the continuous-batching engine, the step coefficients
and the offline job.

    spec.py         scheduler kinds and the latent shape of one sample
    schedule.py     the per-step schedule every guided loop shares: timesteps, eta (deterministic
                    in the attribute band, stochastic below it), the latent shape for height x width
    step_coeffs.py  per-sample coefficient tables for the fused guided step
    engine.py       SamplingEngine: continuous batching of requests on the device
    sampler.py      GuidedDenoiser, sample (the engine), guided_loop / sample_unfused (the plain
                    loop, which InvDiffPipeline runs too)
    job.py          `invdiff sample --prompts`: the resumable offline job

Serving the engine over HTTP (`invdiff serve`: its worker, admission, the FastAPI app, Ray Serve)
is invdiff.serve, which imports this package and never the reverse.

Imports run one way (spec, schedule, step_coeffs -> engine -> sampler -> job), so there is no cycle;
tests/test_sampling_imports.py checks it. The names below load their module on first use
(PEP 562), so `import invdiff.sampling.step_coeffs` does not import diffusers' pipelines.
"""
from __future__ import annotations

from .._lazy import lazy_exports

_EXPORTS = {
    "SCHEDULERS": "spec", "make_scheduler": "spec", "latent_shape": "spec", "check_image_size": "spec",
    "NUM_COEFFS": "step_coeffs", "Col": "step_coeffs", "StepPlan": "step_coeffs", "UnsupportedScheduler": "step_coeffs",
    "plan_steps": "step_coeffs", "guidance_columns": "step_coeffs",
    "Request": "engine", "SamplingEngine": "engine",
    "GuidedDenoiser": "sampler", "sample": "sampler", "sample_unfused": "sampler", "prompts_to_ids": "sampler",
    "below_band_eta": "sampler", "sampling_engine": "sampler", "initial_noise": "sampler", "STOCHASTIC_BELOW_BAND": "sampler",
    "guided_schedule": "schedule", "GuidedSchedule": "schedule", "EtaRule": "schedule", "guided_loop": "sampler",
    "run_sample_job": "job", "read_prompts": "job", "load_samples": "job",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
