"""The continuous-batching engine reproduces the plain one-request sampler image for image,
whatever the arrival order, batch size, step counts or guidance scales."""
import copy
import dataclasses
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


# ----------------------------------------------------------------------- the service's API

def _requests(specs):
    return [Request(p, s, steps, w, request_id=i) for i, (p, s, steps, w) in enumerate(specs)]


SPECS = [(0, 31, 4, 2.0), (3, 32, 5, 1.5), (7, 33, 3, 3.0), (1, 34, 5, 1.0), (5, 35, 4, 2.5)]


def test_cancelling_an_active_request_leaves_the_others_unchanged(denoiser):
    """Cancel a slot in the middle of the batch mid-way (the last slot moves into its hole, with
    its device rows) and a queued request: every other image equals a run without them."""
    engine = SamplingEngine(denoiser, "ddpm", max_batch=4)
    for r in _requests(SPECS):
        engine.submit(r)
    images = engine.step()
    images.update(engine.step())
    assert engine.active_ids() == [0, 1, 2, 3] and engine.queued_ids() == [4]
    assert engine.cancel(1) and engine.cancel(4)
    assert engine.active_ids() == [0, 3, 2] and engine.queued_ids() == []
    assert not engine.cancel(1) and not engine.cancel(99)
    images.update(engine.run())
    assert sorted(images) == [0, 2, 3]
    reference = SamplingEngine(denoiser, "ddpm", max_batch=4).run([r for r in _requests(SPECS) if r.request_id in (0, 2, 3)])
    for i in (0, 2, 3):
        torch.testing.assert_close(images[i], reference[i], rtol=0, atol=1e-5)
        torch.testing.assert_close(images[i], _one_request(denoiser, _requests(SPECS)[i], "ddpm"), rtol=0, atol=1e-4)


class _FailsOnce(GuidedDenoiser):
    """A denoiser whose model call raises once, on its `fail_at`-th call."""

    def __init__(self, inner, fail_at):
        super().__init__(inner.base, inner.guidance, inner.strength)
        self.calls, self.fail_at = 0, fail_at

    def branches(self, *args, **kwargs):
        self.calls += 1
        if self.calls == self.fail_at:
            raise RuntimeError("CUDA out of memory (simulated)")
        return super().branches(*args, **kwargs)


def test_abort_active_after_a_failed_step_keeps_the_queue_and_the_engine_usable(denoiser):
    failing = _FailsOnce(denoiser, fail_at=2)
    engine = SamplingEngine(failing, "ddim", max_batch=2)
    for r in _requests(SPECS[:4]):
        engine.submit(r)
    engine.step()
    with pytest.raises(RuntimeError, match="simulated"):
        engine.step()
    failed = engine.abort_active()
    assert [r.request_id for r in failed] == [0, 1]
    assert engine.active_ids() == [] and engine.queued_ids() == [2, 3]
    images = engine.run()
    assert sorted(images) == [2, 3]
    for r in _requests(SPECS)[2:4]:
        torch.testing.assert_close(images[r.request_id], _one_request(denoiser, r, "ddim"), rtol=0, atol=1e-4)
    assert engine.abort_active() == []


class _Bf16Outputs(GuidedDenoiser):
    """The tiny base's outputs as a bf16 UNet (and G) would give them."""

    def branches(self, *args, **kwargs):
        eps, g = super().branches(*args, **kwargs)
        return eps.to(torch.bfloat16), (g.to(torch.bfloat16) if g is not None else None)


def test_16_bit_model_outputs_reach_the_fused_step_as_they_are(denoiser, monkeypatch):
    """No upcast copy before the step: it reads bf16 eps and G outputs next to the fp32 state,
    and the images equal those of the same outputs upcast first (the step's math is fp32)."""
    from invdiff.sampling import engine as engine_module

    seen = []
    real = engine_module.ops.guided_step

    def spy(x, eps_u, eps_c, g_u, g_c, coeffs, noise=None, out=None):
        seen.append((x.dtype, eps_u.dtype, eps_c.dtype, g_u.dtype, g_c.dtype))
        return real(x, eps_u, eps_c, g_u, g_c, coeffs, noise, out=out)

    monkeypatch.setattr(engine_module.ops, "guided_step", spy)
    narrow = _Bf16Outputs(denoiser.base, denoiser.guidance, denoiser.strength)
    requests = _requests(SPECS[:3])
    images = SamplingEngine(narrow, "ddim", max_batch=3).run(requests)
    assert seen and all(d == (torch.float32,) + (torch.bfloat16,) * 4 for d in seen)

    class Upcast(_Bf16Outputs):
        def branches(self, *args, **kwargs):
            eps, g = super().branches(*args, **kwargs)
            return eps.float(), g.float()

    upcast = SamplingEngine(Upcast(denoiser.base, denoiser.guidance, denoiser.strength), "ddim", max_batch=3).run(requests)
    for r in requests:
        torch.testing.assert_close(images[r.request_id], upcast[r.request_id], rtol=0, atol=1e-5)


def test_a_bf16_frozen_unet_feeds_the_fused_step_in_bf16(denoiser, monkeypatch):
    """A real bf16 UNet: its output reaches the step without an fp32 copy, G's output is rounded
    to bf16 beside it, and the images stay within bf16 rounding of the fp32 model's."""
    from invdiff.sampling import engine as engine_module

    seen = []
    real = engine_module.ops.guided_step

    def spy(x, eps_u, eps_c, g_u, g_c, coeffs, noise=None, out=None):
        seen.append((x.dtype, eps_c.dtype, None if g_c is None else g_c.dtype))
        return real(x, eps_u, eps_c, g_u, g_c, coeffs, noise, out=out)

    requests = _requests(SPECS[:3])
    reference = SamplingEngine(denoiser, "ddim", max_batch=3).run(requests)
    base = copy.deepcopy(denoiser.base)
    base.unet.to(torch.bfloat16)
    monkeypatch.setattr(engine_module.ops, "guided_step", spy)
    images = SamplingEngine(GuidedDenoiser(base, denoiser.guidance, denoiser.strength), "ddim", max_batch=3).run(requests)
    assert seen and all(d == (torch.float32, torch.bfloat16, torch.bfloat16) for d in seen), seen
    for r in requests:
        assert (images[r.request_id] - reference[r.request_id]).abs().max() < 0.1  # bf16 UNet, not a different model


@pytest.mark.parametrize("scheduler", ["ddim", "dpm"])
def test_requests_at_different_strengths_share_one_batch(denoiser, scheduler):
    """Per-slot strength: one engine, one model call per step for all strengths (0 included),
    and each image equals the one-request sampler at its own strength."""
    strengths = [0.0, 0.5, 1.0, 1.7]
    requests = [Request(p, 30 + i, STEPS, 2.0, request_id=i, strength=s) for i, (p, s) in enumerate(zip([0, 4, 4, 9], strengths))]
    engine = SamplingEngine(denoiser, scheduler, max_batch=4)
    images = engine.run(requests)
    assert engine.model_evaluations == STEPS  # every strength in the same batched calls
    for r in requests:
        at_strength = GuidedDenoiser(denoiser.base, denoiser.guidance, r.strength)
        torch.testing.assert_close(images[r.request_id], _one_request(at_strength, r, scheduler), rtol=0, atol=1e-4,
                                   msg=lambda m: f"{scheduler} strength {r.strength}: {m}")
    # Strengths do matter on this G (the test would pass trivially if they did not).
    assert (images[1] - images[2]).abs().max() > 1e-3 and (images[0] - images[1]).abs().max() > 1e-3


def test_a_request_without_a_strength_is_bitwise_the_denoisers_strength(denoiser):
    """Request.strength None takes the denoiser's; the per-slot table must not change one bit of
    an image sampled the old way (the demo matrix's cells are compared bit for bit)."""
    plain = [Request(0, 5, STEPS, 2.0, request_id=0), Request(3, 6, STEPS, 1.0, request_id=1)]
    explicit = [dataclasses.replace(r, strength=denoiser.strength) for r in plain]
    first = SamplingEngine(denoiser, "ddim", max_batch=2).run(plain)
    second = SamplingEngine(denoiser, "ddim", max_batch=2).run(explicit)
    for i in (0, 1):
        assert torch.equal(first[i], second[i])
    with pytest.raises(ValueError, match="strength must be a finite number"):
        SamplingEngine(denoiser, "ddim").submit(Request(0, 1, STEPS, strength=float("nan")))
