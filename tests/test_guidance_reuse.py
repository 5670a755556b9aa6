"""guidance_every = k: G_psi's UNet body runs at each image's steps 0, k, 2k, ... and its output
is reused between, while G's head, gains and band gate run at every step. The engine (continuous
batching, slots at different steps) must give every image what the plain one-request loop gives
it, and run the body on the fresh rows only."""
import json
import os
import random

import pytest
import torch

from invdiff.models.guidance import GuidanceModule
from invdiff.sampling import GuidedDenoiser, sample, sample_unfused
from invdiff.sampling.engine import Request
from invdiff.sampling.sampler import sampling_engine
from invdiff.sampling.schedule import GuidedSchedule, EtaRule


def _guided(base, ratio=2.0, t_min=0, strength=0.8):
    """The tiny base with a G whose weights are random (not the zero init), so that G matters."""
    torch.manual_seed(0)
    guidance = GuidanceModule.from_frozen(base.unet.config, preset="tiny", ratio=ratio, t_min=t_min)
    for p in guidance.parameters():
        p.data.normal_(0.0, 0.05)
    return GuidedDenoiser(base, guidance, strength=strength)


def _one_request(denoiser, request, scheduler, every):
    ids = torch.tensor([request.prompt_id])
    return sample_unfused(denoiser, ids, [request.seed], request.steps, request.guidance_scale, scheduler, progress=False,
                          guidance_every=every)[0]


class _RowCounter:
    """Counts the rows G's UNet body sees."""

    def __init__(self, guidance):
        self.rows = 0
        self._forward = guidance.unet.forward
        guidance.unet.forward = self

    def __call__(self, sample, *args, **kwargs):
        self.rows += sample.shape[0]
        return self._forward(sample, *args, **kwargs)


@pytest.mark.parametrize("scheduler", ["ddim", "dpm"])
@pytest.mark.parametrize("every", [2, 3])
def test_engine_with_reuse_equals_the_one_request_loop(frozen_tiny_base, scheduler, every):
    """Mixed step counts, guidance scales (with and without CFG in one batch) and strengths,
    arriving out of order into 2 slots, so that slots sit at different steps, join mid-run and
    move when others finish."""
    denoiser = _guided(frozen_tiny_base)
    specs = [(0, 11, 5, 2.0, None), (4, 12, 4, 1.0, 1.3), (9, 13, 6, 3.5, 0.0), (2, 14, 3, 1.0, None), (7, 15, 5, 2.0, 0.5)]
    requests = [Request(p, s, n, w, request_id=i, strength=st) for i, (p, s, n, w, st) in enumerate(specs)]
    order = requests[:]
    random.Random(3).shuffle(order)
    engine = sampling_engine(denoiser, scheduler, max_batch=2, guidance_every=every)
    images = engine.run(order)
    for r in requests:
        strength = denoiser.strength if r.strength is None else r.strength
        expected = _one_request(GuidedDenoiser(denoiser.base, denoiser.guidance, strength), r, scheduler, every)
        torch.testing.assert_close(images[r.request_id], expected, rtol=0, atol=1e-4,
                                   msg=lambda m: f"{scheduler}, every {every}, request {r.request_id}: {m}")


def test_reuse_runs_the_body_on_the_fresh_steps_only_and_changes_the_images(frozen_tiny_base):
    denoiser = _guided(frozen_tiny_base)
    ids, seeds, steps = torch.tensor([1, 5, 8]), [3, 4, 5], 5
    counter = _RowCounter(denoiser.guidance)
    every_step = sample(denoiser, ids, seeds, steps, 2.0, progress=False)
    assert counter.rows == 3 * 2 * steps  # 3 images, both CFG branches, every step
    counter.rows = 0
    reused = sample(denoiser, ids, seeds, steps, 2.0, progress=False, guidance_every=2)
    assert counter.rows == 3 * 2 * 3  # steps 0, 2 and 4
    # The body's output is reused, not dropped: closer to G at every step than the frozen model alone.
    frozen = sample(GuidedDenoiser(denoiser.base, None), ids, seeds, steps, 2.0, progress=False)
    assert not torch.allclose(reused, every_step, atol=1e-3)
    assert (reused - every_step).abs().mean() < (frozen - every_step).abs().mean()


def test_every_1_is_bitwise_the_default(frozen_tiny_base):
    denoiser = _guided(frozen_tiny_base)
    ids, seeds = torch.tensor([0, 3]), [1, 2]
    assert torch.equal(sample(denoiser, ids, seeds, 4, 2.0, progress=False),
                       sample(denoiser, ids, seeds, 4, 2.0, progress=False, guidance_every=1))


@pytest.mark.parametrize("ratio", [2.0, 0.5])
def test_reuse_inside_and_outside_a_band(frozen_tiny_base, ratio):
    """A G gated to t >= 500, with either branch of the combine rule (r <= 1: its output outside
    the band is a multiple of each step's frozen prediction): the engine and the loop agree, and
    outside the band every image gets the frozen model alone."""
    denoiser = _guided(frozen_tiny_base, ratio=ratio, t_min=500)
    requests = [Request(3, 7, 6, 2.0, request_id=0), Request(6, 8, 4, 1.0, request_id=1)]
    images = sampling_engine(denoiser, "ddim", max_batch=1, guidance_every=2).run(requests)
    for r in requests:
        torch.testing.assert_close(images[r.request_id], _one_request(denoiser, r, "ddim", 2), rtol=0, atol=1e-4)


def test_the_head_runs_every_step(frozen_tiny_base):
    """G without a body (the recalibration head alone): reusing the body changes nothing."""
    torch.manual_seed(0)
    guidance = GuidanceModule.from_frozen(frozen_tiny_base.unet.config, preset="tiny", body=False)
    for p in guidance.parameters():
        p.data.normal_(0.0, 0.05)
    denoiser = GuidedDenoiser(frozen_tiny_base, guidance, 1.0)
    ids, seeds = torch.tensor([2, 4]), [5, 6]
    torch.testing.assert_close(sample(denoiser, ids, seeds, 4, progress=False, guidance_every=3),
                               sample(denoiser, ids, seeds, 4, progress=False), rtol=0, atol=1e-5)


def test_bad_guidance_every_is_refused_with_the_reason(tiny_sd):
    from invdiff.models.lora import LoraGuidance
    from invdiff.models.sd import LatentDiffusionBase

    with pytest.raises(ValueError, match="integer >= 1"):
        GuidedSchedule(EtaRule(0.0, None, 0), (3, 8, 8), guidance_every=0)
    base = LatentDiffusionBase.from_pretrained(tiny_sd).freeze()
    ids = base.conditioner.prompt_ids(["a red square"])
    lora = GuidedDenoiser(base, LoraGuidance.from_frozen(base.unet, rank=2), 1.0)
    with pytest.raises(ValueError, match="no body apart from its output"):
        sample(lora, ids, [0], 4, progress=False, guidance_every=2)
    assert sample(lora, ids, [0], 2, progress=False).shape[0] == 1  # every step is fine


@pytest.fixture(scope="module")
def noisy_run(tmp_path_factory):
    """A debias run folder whose G has random weights (a 2-step G barely moves from its zero init)."""
    from invdiff.cli import main

    root = tmp_path_factory.mktemp("every")
    base, run = str(root / "base"), str(root / "run")
    data = ["--resolution", "8"]
    assert main(["train-base", *data, "--steps", "3", "--out", base]) == 0
    assert main(["debias", "--base", base, *data, "--out", run, "--groups", "2", "--steps", "2", "--batch-size", "16",
                 "--loss-timesteps", "2", "--loss-draws", "1", "--no-calibrate"]) == 0
    folder = os.path.join(run, "guidance")
    guidance = GuidanceModule.from_pretrained(folder)
    torch.manual_seed(1)
    for p in guidance.parameters():
        p.data.normal_(0.0, 0.05)
    guidance.save_pretrained(folder)
    return root, run


def test_cli_sample_and_job_take_guidance_every(noisy_run):
    from invdiff.cli import main
    from invdiff.model_folders.load import load_model
    from invdiff.report import to_uint8
    from invdiff.sampling import prompts_to_ids
    from invdiff.sampling.job import load_samples

    root, run = noisy_run
    base, guidance = load_model(run)
    ids = prompts_to_ids(base, ["digit 3", "digit 3"])
    expected = {k: to_uint8(sample(GuidedDenoiser(base, guidance, 1.0), ids, [0, 1], 4, progress=False, guidance_every=k))
                for k in (1, 2)}
    assert not torch.equal(expected[1], expected[2])
    out = str(root / "imgs")
    assert main(["sample", "--model", run, "--prompt", "digit 3", "--num", "2", "--steps", "4", "--guidance-every", "2",
                 "--out", out]) == 0
    with open(os.path.join(out, "manifest.json")) as f:
        assert json.load(f)["settings"]["guidance_every"] == 2
    images, _ = load_samples(out)
    assert torch.equal(to_uint8(images), expected[2])
    prompts = root / "prompts.txt"
    prompts.write_text("digit 3\n")
    job = str(root / "job")
    assert main(["sample", "--model", run, "--prompts", str(prompts), "--num", "2", "--steps", "4", "--guidance-every", "2",
                 "--out", job]) == 0
    images, _ = load_samples(job)
    assert torch.equal(to_uint8(images), expected[2])
    # The same job folder at another k is another job: refused, not mixed.
    assert main(["sample", "--model", run, "--prompts", str(prompts), "--num", "2", "--steps", "4", "--resume", "--out", job]) == 2
