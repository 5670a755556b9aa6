"""Guided sampling: determinism per seed, every scheduler, the guidance wrapper."""
import pytest
import torch

from invdiff.models.guidance import GuidanceModule
from invdiff.sampling import SCHEDULERS, GuidedDenoiser, make_scheduler, sample


@pytest.mark.parametrize("scheduler", ["ddpm", "ddim"])
def test_image_depends_on_its_seed_only(frozen_tiny_base, scheduler):
    """Same (prompt, seed) -> same image whatever the batch size or position (ancestral noise too)."""
    den = GuidedDenoiser(frozen_tiny_base)
    ids = torch.tensor([3, 1, 4, 1, 5])
    seeds = [10, 11, 12, 13, 14]
    together = sample(den, ids, seeds, steps=3, scheduler=scheduler, batch_size=5, progress=False)
    apart = sample(den, ids, seeds, steps=3, scheduler=scheduler, batch_size=2, progress=False)
    torch.testing.assert_close(together, apart, rtol=1e-5, atol=1e-5)
    reordered = sample(den, ids.flip(0), seeds[::-1], steps=3, scheduler=scheduler, batch_size=5, progress=False)
    torch.testing.assert_close(together, reordered.flip(0), rtol=1e-5, atol=1e-5)
    other_seed = sample(den, ids[:1], [99], steps=3, scheduler=scheduler, progress=False)
    assert not torch.allclose(other_seed, together[:1])


@pytest.mark.parametrize("scheduler", sorted(SCHEDULERS))
def test_every_scheduler_samples_in_range(frozen_tiny_base, scheduler):
    out = sample(GuidedDenoiser(frozen_tiny_base), torch.tensor([0, 9]), [0, 1], steps=3, scheduler=scheduler, progress=False)
    cfg = frozen_tiny_base.unet.config
    assert out.shape == (2, cfg.in_channels, cfg.sample_size, cfg.sample_size)
    assert torch.isfinite(out).all() and out.abs().max() <= 1.0


def test_zero_init_guidance_is_the_frozen_model(frozen_tiny_base):
    """A fresh G_psi (zero output layer, residual branch) must not change a single sample."""
    g = GuidanceModule.from_frozen(frozen_tiny_base.unet.config, "small", ratio=2.0)
    ids, seeds = torch.tensor([2, 7]), [5, 6]
    plain = sample(GuidedDenoiser(frozen_tiny_base), ids, seeds, steps=3, progress=False)
    guided = sample(GuidedDenoiser(frozen_tiny_base, g), ids, seeds, steps=3, progress=False)
    torch.testing.assert_close(plain, guided, rtol=0, atol=0)


def test_guidance_changes_samples_and_strength_zero_disables_it(frozen_tiny_base):
    g = GuidanceModule.from_frozen(frozen_tiny_base.unet.config, "small", ratio=2.0)
    torch.nn.init.normal_(g.unet.conv_out.weight, std=0.5)
    ids, seeds = torch.tensor([2, 7]), [5, 6]
    plain = sample(GuidedDenoiser(frozen_tiny_base), ids, seeds, steps=3, progress=False)
    guided = sample(GuidedDenoiser(frozen_tiny_base, g), ids, seeds, steps=3, progress=False)
    off = sample(GuidedDenoiser(frozen_tiny_base, g, strength=0.0), ids, seeds, steps=3, progress=False)
    assert (plain - guided).abs().max() > 1e-3
    torch.testing.assert_close(plain, off, rtol=0, atol=0)


def test_bad_arguments(frozen_tiny_base):
    den = GuidedDenoiser(frozen_tiny_base)
    with pytest.raises(ValueError, match="seeds"):
        sample(den, torch.tensor([1, 2]), [0], steps=2, progress=False)
    with pytest.raises(ValueError, match="steps"):
        sample(den, torch.tensor([1]), [0], steps=0, progress=False)
    with pytest.raises(ValueError, match="unknown scheduler"):
        make_scheduler("heun-but-not-really", frozen_tiny_base.scheduler.config)
