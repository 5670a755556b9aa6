"""One schedule for the three guided loops (issue 22): the continuous-batching engine (`sample`,
`invdiff sample`, the service, the demo), the plain loop (`sample_unfused`) and InvDiffPipeline
draw the same images, and all three step DDIM deterministically in G's attribute band and
stochastically below it (sampling.STOCHASTIC_BELOW_BAND), as a plain diffusers loop does.

All on the tiny Stable Diffusion folder (a latent base: the pipeline needs one), 5 steps, two
images."""
import pytest
import torch
from diffusers import DDIMScheduler

from invdiff.models.guidance import GuidanceModule
from invdiff.models.sd import LatentDiffusionBase
from invdiff.pipeline import InvDiffPipeline
from invdiff.sampling import STOCHASTIC_BELOW_BAND, SCHEDULERS, GuidedDenoiser, Request, make_scheduler, sample, sample_unfused
from invdiff.sampling.sampler import sampling_engine
from invdiff.sampling.schedule import EtaRule, guided_schedule

PROMPTS = ["a red square", "a blue square"]
SEEDS = [3, 4]
STEPS = 5  # DDIM timesteps 800, 600 in the band, 400, 200, 0 below it
BAND = 600  # G's band_start, as the max step records it
SCALE = 2.0

# The engine's fused step computes the scheduler update from a float32 coefficient table in one op;
# diffusers' `step` evaluates its own formula. The two round differently by a few float32 ulps per
# step (the images came out within 1e-6 of each other when this was written), so the engine is
# compared within 100 ulps at 1, far below the effect of the eta rule (checked below: > 0.1).
ENGINE_ATOL = 100 * torch.finfo(torch.float32).eps


@pytest.fixture(scope="module")
def sd(tiny_sd):
    """(base, G, prompt ids): the tiny SD base, and a G whose weights are random (it matters)
    with the attribute band recorded in its config."""
    base = LatentDiffusionBase.from_pretrained(tiny_sd).freeze()
    torch.manual_seed(0)
    guidance = GuidanceModule.from_frozen(base.unet.config, preset="small", ratio=2.0, band_start=BAND)
    for p in guidance.parameters():
        p.data.normal_(0.0, 0.02)
    return base, guidance.eval(), base.conditioner.prompt_ids(PROMPTS)


def _pipeline(base, guidance, scheduler: str) -> InvDiffPipeline:
    scheduler = make_scheduler(scheduler, base.scheduler.config)
    pipe = InvDiffPipeline(base.unet, base.vae, base.text_encoder, base.tokenizer, scheduler, guidance)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _pipeline_images(base, guidance, scheduler, output_type="pt", **kwargs):
    # One generator per image, seeded as `sample` seeds them: the image depends on its seed only.
    gens = [torch.Generator().manual_seed(s) for s in SEEDS]
    return _pipeline(base, guidance, scheduler)(PROMPTS, num_inference_steps=STEPS, guidance_scale=SCALE, generator=gens,
                                                 output_type=output_type, **kwargs).images


def _engine_latents(denoiser, ids, **kwargs):
    engine = sampling_engine(denoiser, "ddim", 4, **kwargs)
    engine.postprocess = lambda x: x.cpu()  # the final latents, undecoded
    out = engine.run([Request(int(p), s, STEPS, SCALE, request_id=i) for i, (p, s) in enumerate(zip(ids.tolist(), SEEDS))])
    return torch.stack([out[i] for i in range(len(SEEDS))])


@pytest.mark.parametrize("scheduler", sorted(SCHEDULERS))
def test_engine_plain_loop_and_pipeline_draw_the_same_images(sd, scheduler):
    """Same seeds, scheduler, G band and eta rule, at a size other than the UNet's native one."""
    base, guidance, ids = sd
    denoiser = GuidedDenoiser(base, guidance)
    size = dict(height=12, width=16)  # latents 6 x 8; the UNet's own size is 8 x 8
    engine = sample(denoiser, ids, SEEDS, STEPS, SCALE, scheduler, progress=False, **size)
    plain = sample_unfused(denoiser, ids, SEEDS, STEPS, SCALE, scheduler, progress=False, **size)
    pipe = _pipeline_images(base, guidance, scheduler, **size)
    assert engine.shape == plain.shape == pipe.shape == (2, 3, 12, 16)
    # The pipeline runs the plain loop itself (sampler.guided_loop) on the same embeddings: equal,
    # once its [0, 1] output is mapped back as diffusers' VaeImageProcessor maps it.
    assert torch.equal(pipe, plain * 0.5 + 0.5)
    torch.testing.assert_close(engine, plain, rtol=0, atol=ENGINE_ATOL)


def _diffusers_ddim(base, guidance, ids, eta_at):
    """The reference: a plain diffusers DDIM loop written out here, with eta_at(t) at each step and
    the per-image generators drawing both the initial noise and the step noise. Returns latents."""
    scheduler = DDIMScheduler.from_config(base.scheduler.config)
    scheduler.set_timesteps(STEPS)
    gens = [torch.Generator().manual_seed(s) for s in SEEDS]
    shape = (base.unet.config.in_channels, base.unet.config.sample_size, base.unet.config.sample_size)
    x = torch.stack([torch.randn(shape, generator=g) for g in gens]) * scheduler.init_noise_sigma
    denoiser = GuidedDenoiser(base, guidance)
    cond = base.prompt_embeds(ids)
    uncond = base.prompt_embeds(torch.full_like(ids, base.conditioner.null_id))
    for t in scheduler.timesteps:  # DDIM's scale_model_input is the identity
        eps_u, eps_c = denoiser(torch.cat([x, x]), t.expand(2 * len(SEEDS)), torch.cat([uncond, cond])).chunk(2)
        eps = eps_u + SCALE * (eps_c - eps_u)
        x = scheduler.step(eps, t, x, eta=eta_at(int(t)), generator=gens).prev_sample
    return x


@pytest.mark.parametrize("eta_below", [None, 0.5], ids=["default", "eta_below_0.5"])
def test_below_band_eta_matches_a_plain_diffusers_loop(sd, eta_below):
    base, guidance, ids = sd
    below = STOCHASTIC_BELOW_BAND if eta_below is None else eta_below
    denoiser = GuidedDenoiser(base, guidance)
    schedule = guided_schedule(denoiser, "ddim", eta_below=eta_below)
    assert schedule.rule == EtaRule(0.0, below, BAND)  # t_switch: G's recorded band
    steps = schedule.steps(DDIMScheduler.from_config(base.scheduler.config), STEPS)
    assert [(int(t), eta) for t, eta in steps] == [(800, 0.0), (600, 0.0), (400, below), (200, below), (0, below)]

    expected = _diffusers_ddim(base, guidance, ids, lambda t: 0.0 if t >= BAND else below)
    # The rule matters here: neither a deterministic loop nor eta_below at every step is close.
    for other in (lambda t: 0.0, lambda t: below):
        assert (_diffusers_ddim(base, guidance, ids, other) - expected).abs().max() > 0.1

    plain = sample_unfused(denoiser, ids, SEEDS, STEPS, SCALE, "ddim", progress=False, eta_below=eta_below)
    assert torch.equal(plain, base.decode_latents(expected))
    pipe = _pipeline_images(base, guidance, "ddim", output_type="latent", eta_below_band=eta_below)
    assert torch.equal(pipe, expected)
    engine = _engine_latents(denoiser, ids, eta_below=eta_below)
    torch.testing.assert_close(engine, expected, rtol=0, atol=ENGINE_ATOL)


def test_an_explicit_band_without_g(sd):
    """The demo samples its base rows with the setting's band and no G (band_start=...): the engine
    and the plain loop follow that band as they follow G's."""
    base, _, ids = sd
    denoiser = GuidedDenoiser(base, None)
    expected = _diffusers_ddim(base, None, ids, lambda t: 0.0 if t >= 400 else STOCHASTIC_BELOW_BAND)
    plain = sample_unfused(denoiser, ids, SEEDS, STEPS, SCALE, "ddim", progress=False, band_start=400)
    assert torch.equal(plain, base.decode_latents(expected))
    torch.testing.assert_close(_engine_latents(denoiser, ids, band_start=400), expected, rtol=0, atol=ENGINE_ATOL)
    # Without a band (no G, none given) DDIM is deterministic throughout.
    assert guided_schedule(denoiser, "ddim").rule == EtaRule(0.0, None, 0)


def test_guided_schedule(sd):
    base, guidance, _ = sd
    denoiser = GuidedDenoiser(base, guidance)
    # A scheduler without an eta keeps the band but no eta: its steps take none.
    euler = guided_schedule(denoiser, "euler")
    assert euler.rule == EtaRule(0.0, None, BAND)
    assert all(eta is None for _, eta in euler.steps(make_scheduler("euler", base.scheduler.config), STEPS))
    # A DDIM instance (the pipeline's) is DDIM as the name is.
    assert guided_schedule(denoiser, DDIMScheduler.from_config(base.scheduler.config)).rule == EtaRule(0.0, STOCHASTIC_BELOW_BAND, BAND)
    assert guided_schedule(denoiser, "ddim", band_start=0).rule == EtaRule(0.0, None, 0)
    assert guided_schedule(denoiser, "ddim", eta=0.2, band_start=300).rule == EtaRule(0.2, STOCHASTIC_BELOW_BAND, 300)
    # The latent shape: the UNet's own without a size, pixels / the VAE's factor with one.
    assert guided_schedule(denoiser).shape == (4, 8, 8)
    assert guided_schedule(denoiser, height=12, width=16).shape == (4, 6, 8)
    with pytest.raises(ValueError, match="height 13"):
        guided_schedule(denoiser, height=13)
    with pytest.raises(ValueError, match="band_start"):
        guided_schedule(denoiser, band_start=-1)
    with pytest.raises(ValueError, match="eta below the band"):
        guided_schedule(denoiser, eta_below=-0.5)
    # The pipeline's own initial latents must have the size asked for.
    with pytest.raises(ValueError, match="initial noise of shape"):
        _pipeline(base, guidance, "ddim")(PROMPTS[0], num_inference_steps=1, height=12, width=16, latents=torch.zeros(1, 4, 8, 8))
