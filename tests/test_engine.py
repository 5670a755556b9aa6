"""The continuous-batching engine reproduces the plain one-request sampler image for image,
whatever the arrival order, batch size, step counts or guidance scales."""
import random

import pytest
import torch

from invdiff.sampling.engine import Request, SamplingEngine
from invdiff.models.guidance import GuidanceModule
from invdiff.sampling import GuidedDenoiser, sample, sample_unfused

STEPS = 5


@pytest.fixture()
def denoiser(frozen_tiny_base):
    """The tiny base with a G_psi whose weights are random (not the zero init), so G matters."""
    torch.manual_seed(0)
    guidance = GuidanceModule.from_frozen(frozen_tiny_base.unet.config, preset="tiny", ratio=2.0)
    for p in guidance.parameters():
        p.data.normal_(0.0, 0.05)
    return GuidedDenoiser(frozen_tiny_base, guidance, strength=0.8)


def _tolerance(denoiser, scheduler):
    """Float tolerance between two correct samplers. Euler on this cosine schedule starts at
    sigma ~ 2e4, where x - x0 cancels in fp32: the first step's error is an ulp of |x_T|."""
    if scheduler != "euler":
        return 1e-4
    from invdiff.sampling import make_scheduler

    sigma = float(make_scheduler("euler", denoiser.base.scheduler.config).init_noise_sigma)
    return 8 * torch.finfo(torch.float32).eps * sigma * 5  # |noise| < 5


def _one_request(denoiser, request, scheduler, eta=0.0):
    ids = torch.tensor([request.prompt_id])
    return sample_unfused(denoiser, ids, [request.seed], request.steps, request.guidance_scale, scheduler, progress=False, eta=eta)[0]


@pytest.mark.parametrize("scheduler, eta", [("ddim", 0.0), ("ddim", 0.7), ("ddpm", 0.0), ("euler", 0.0), ("dpm", 0.0)])
def test_engine_equals_the_one_request_sampler(denoiser, scheduler, eta):
    requests = [Request(prompt_id=p, seed=s, steps=STEPS, guidance_scale=w, request_id=i)
                for i, (p, s, w) in enumerate([(0, 11, 2.0), (4, 12, 1.0), (9, 13, 3.5)])]
    order = requests[:]
    random.Random(1).shuffle(order)
    engine = SamplingEngine(denoiser, scheduler, max_batch=2, eta=eta)
    images = engine.run(order)
    assert (engine.fused_reason is None) == (scheduler != "dpm")
    tol = _tolerance(denoiser, scheduler)
    for r in requests:
        expected = _one_request(denoiser, r, scheduler, eta)
        torch.testing.assert_close(images[r.request_id], expected, rtol=0, atol=tol, msg=lambda m: f"{scheduler} request {r.request_id}: {m}")


def test_mixed_steps_scales_and_arrivals_mid_run(denoiser):
    """Requests with different step counts and scales, some arriving while others are halfway."""
    first = [Request(0, 21, 4, 2.0, request_id=0), Request(3, 22, 2, 1.5, request_id=1)]
    later = [Request(7, 23, 3, 4.0, request_id=2), Request(1, 24, 5, 1.0, request_id=3)]
    engine = SamplingEngine(denoiser, "ddpm", max_batch=3)
    for r in first:
        engine.submit(r)
    images = {}
    images.update(engine.step())
    images.update(engine.step())  # request 1 (2 steps) finishes here
    assert 1 in images and engine.active == 1
    for r in later:
        engine.submit(r)
    images.update(engine.run())
    assert sorted(images) == [0, 1, 2, 3]
    for r in first + later:
        torch.testing.assert_close(images[r.request_id], _one_request(denoiser, r, "ddpm"), rtol=0, atol=1e-4)


def test_a_finished_request_frees_its_slot_at_once(denoiser):
    """Steps [1, 3, 2] on 2 slots take 3 batched model calls; static batches would take 5."""
    engine = SamplingEngine(denoiser, "ddim", max_batch=2)
    engine.run([Request(0, 1, 1), Request(1, 2, 3), Request(2, 3, 2)])
    assert engine.model_evaluations == 3 and engine.slot_steps == 6


@pytest.mark.parametrize("batch_size", [1, 4])
def test_sample_uses_the_engine_and_matches_the_unfused_loop(denoiser, batch_size):
    ids, seeds = torch.tensor([0, 5, 5, 2]), [3, 4, 5, 6]
    fused = sample(denoiser, ids, seeds, STEPS, 2.0, "ddim", batch_size=batch_size, progress=False)
    plain = sample_unfused(denoiser, ids, seeds, STEPS, 2.0, "ddim", batch_size=4, progress=False)
    assert fused.shape == plain.shape == (4, 3, 16, 16)
    torch.testing.assert_close(fused, plain, rtol=0, atol=1e-4)


def test_base_model_without_guidance(frozen_tiny_base):
    den = GuidedDenoiser(frozen_tiny_base, None)
    r = Request(2, 9, STEPS, 2.0, request_id=0)
    image = SamplingEngine(den, "ddim", max_batch=4).run([r])[0]
    torch.testing.assert_close(image, _one_request(den, r, "ddim"), rtol=0, atol=1e-4)


def test_bad_requests_are_clear_errors(denoiser):
    engine = SamplingEngine(denoiser, "ddim")
    with pytest.raises(ValueError, match="steps must be >= 1"):
        engine.submit(Request(0, 1, steps=0))
    with pytest.raises(ValueError, match="prompt id 99"):
        engine.submit(Request(99, 1))
    with pytest.raises(ValueError, match="max_batch"):
        SamplingEngine(denoiser, "ddim", max_batch=0)
