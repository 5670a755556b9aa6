"""The sharper max step (mixture), the frozen-prediction bank and the min step's t proposal."""
import dataclasses

import pytest
import torch

from invdiff.environments import (
    FrozenBank,
    collect_losses,
    draw_proposal,
    infer_environments,
    infer_environments_mixture,
    spread_weights,
)
from invdiff.models.guidance import GuidanceModule
from invdiff.config import DebiasConfig
from invdiff.environments import environment_weights
from invdiff.training import MinStepConfig, train_guidance


def _minority_share_of_high_group(w, scores, hot):
    means = (w * scores[:, None]).sum(0) / w.sum(0)
    high = int(means.argmax())
    return float(w[hot, high].sum() / w[:, high].sum())


def test_mixture_isolates_a_rare_high_loss_cluster_better_than_official():
    """10% of samples form a well-separated high-loss cluster: the mixture's high group is mostly
    them, the official std-maximisation's high group cuts near the middle and is mostly not."""
    gen = torch.Generator().manual_seed(0)
    n = 1000
    scores = torch.randn(n, generator=gen)
    hot = torch.randperm(n, generator=gen)[:100]
    scores[hot] += 5.0
    mix = infer_environments_mixture(scores, 2)
    official = infer_environments(scores, 2)
    assert torch.allclose(mix.sum(1), torch.ones(n), atol=1e-5) and (mix >= 0).all()
    share_mix = _minority_share_of_high_group(mix, scores, hot)
    share_official = _minority_share_of_high_group(official, scores, hot)
    assert share_mix > 0.9, share_mix
    assert share_mix > share_official + 0.2, (share_mix, share_official)


def test_mixture_groups_are_sorted_by_mean_and_deterministic():
    gen = torch.Generator().manual_seed(1)
    scores = torch.cat([torch.randn(300, generator=gen), torch.randn(60, generator=gen) + 6])
    a = infer_environments_mixture(scores, 2, seed=0)
    b = infer_environments_mixture(scores, 2, seed=0)
    assert torch.equal(a, b)
    means = (a * scores[:, None]).sum(0) / a.sum(0)
    assert means[0] < means[1]


@pytest.mark.parametrize("k", [1, 10_000])
def test_mixture_rejects_bad_group_count(k):
    with pytest.raises(ValueError, match="K must be in"):
        infer_environments_mixture(torch.randn(50), k)


def test_spread_weights_follow_the_coefficient_of_variation():
    gen = torch.Generator().manual_seed(0)
    base = 1.0 + 0.05 * torch.randn(100, 3, generator=gen)
    base[:, 2] = 1.0 + 0.5 * torch.randn(100, generator=gen)  # samples disagree most at the last t
    w = spread_weights(base.double(), torch.zeros(100, dtype=torch.long))
    assert w.shape == (3,) and float(w.sum()) == pytest.approx(1.0)
    assert int(w.argmax()) == 2 and float(w[2]) > 0.9


def test_draw_proposal_is_a_distribution_leaning_to_high_spread():
    gen = torch.Generator().manual_seed(0)
    losses = 1.0 + 0.05 * torch.randn(80, 4, generator=gen)
    losses[:, 3] = 1.0 + 0.8 * torch.rand(80, generator=gen)
    q = draw_proposal(losses, torch.zeros(80, dtype=torch.long), draws=2, mix=0.5)
    assert q.shape == (8,) and float(q.sum()) == pytest.approx(1.0, abs=1e-6)
    assert (q >= 0.5 / 8 - 1e-7).all()  # the uniform half keeps every draw reachable
    assert float(q[6:].sum()) > 0.4
    uniform = draw_proposal(losses, torch.zeros(80, dtype=torch.long), draws=2, mix=1.0)
    torch.testing.assert_close(uniform, torch.full((8,), 1 / 8))
    with pytest.raises(ValueError):
        draw_proposal(losses, torch.zeros(80, dtype=torch.long), draws=2, mix=0.0)


@pytest.mark.parametrize("method", ["gap", "mixture", "official"])
def test_every_max_step_is_label_free(frozen_tiny_base, tiny_train, method):
    cfg = DebiasConfig(groups=2, loss_timesteps=2, loss_draws=1, max_step_steps=20, max_step=method)
    w, s, _, _ = environment_weights(frozen_tiny_base, tiny_train, cfg, progress=False)
    flipped = {"color": 1 - tiny_train.attributes["color"], "digit": tiny_train.attributes["digit"].flip(0)}
    for attrs in (flipped, None):
        w2, s2, _, _ = environment_weights(frozen_tiny_base, dataclasses.replace(tiny_train, attributes=attrs), cfg, progress=False)
        assert torch.equal(w2, w) and torch.equal(s2, s)


def test_unknown_max_step_is_rejected():
    with pytest.raises(ValueError, match="max_step"):
        DebiasConfig(max_step="psychic").validate(100)


def test_bank_matches_a_fresh_frozen_forward(frozen_tiny_base, tiny_train):
    losses, grid, bank = collect_losses(frozen_tiny_base, tiny_train, num_timesteps=2, draws=2, progress=False, return_bank=True)
    assert isinstance(bank, FrozenBank)
    assert bank.timesteps.tolist() == [250, 250, 750, 750]
    assert bank.pred.shape == (len(tiny_train), 4, *tiny_train.images.shape[1:])
    i, j = 5, 3
    t = bank.timesteps[j : j + 1]
    x_t = frozen_tiny_base.scheduler.add_noise(tiny_train.images[i : i + 1], bank.noise[i, j : j + 1], t)
    with torch.no_grad():
        fresh = frozen_tiny_base.eps(x_t, t, frozen_tiny_base.prompt_embeds(tiny_train.prompt_ids[i : i + 1]))
    torch.testing.assert_close(bank.pred[i, j : j + 1], fresh, rtol=1e-5, atol=1e-5)


def test_min_step_with_bank_skips_the_frozen_forward(frozen_tiny_base, tiny_train, monkeypatch):
    """With the bank and no prompt dropout the frozen UNet never runs during the min step."""
    _, _, bank = collect_losses(frozen_tiny_base, tiny_train, num_timesteps=2, draws=1, progress=False, return_bank=True)
    calls = []
    real = frozen_tiny_base.eps
    monkeypatch.setattr(frozen_tiny_base, "eps", lambda *a, **k: calls.append(a[0].shape[0]) or real(*a, **k))
    g = GuidanceModule.from_frozen(frozen_tiny_base.unet.config, "tiny")
    cfg = MinStepConfig(steps=3, batch_size=8, lr=1e-3, lam_mode="absolute", cfg_dropout=0.0)
    log = train_guidance(frozen_tiny_base, g, tiny_train, torch.rand(len(tiny_train), 2), cfg, progress=False, bank=bank)
    assert calls == []
    assert len(log) == 4 and all(torch.isfinite(torch.tensor(r["loss"])) for r in log[:-1])
    # ... while without the bank it runs once per step
    train_guidance(frozen_tiny_base, g, tiny_train, torch.rand(len(tiny_train), 2), cfg, progress=False)
    assert calls == [8, 8, 8]


def test_min_step_moves_g_off_zero(frozen_tiny_base, tiny_train):
    _, _, bank = collect_losses(frozen_tiny_base, tiny_train, num_timesteps=2, draws=1, progress=False, return_bank=True)
    bank = dataclasses.replace(bank, proposal=torch.tensor([0.25, 0.75]))
    g = GuidanceModule.from_frozen(frozen_tiny_base.unet.config, "tiny")
    train_guidance(frozen_tiny_base, g, tiny_train, torch.rand(len(tiny_train), 2), MinStepConfig(steps=5, batch_size=8, lr=1e-2, lam_mode="absolute"), progress=False, bank=bank)
    x = tiny_train.images[:4]
    t = torch.full((4,), 750)
    e = frozen_tiny_base.prompt_embeds(tiny_train.prompt_ids[:4])
    with torch.no_grad():
        assert float(g(x, t, e, frozen_tiny_base.eps(x, t, e)).abs().max()) > 0


def test_per_prompt_groups_stay_inside_their_prompt():
    from invdiff.environments import MaxStepPolicy, infer_groups

    gen = torch.Generator().manual_seed(0)
    prompt_ids = torch.arange(3).repeat_interleave(100)
    scores = torch.randn(300, generator=gen)
    hot = torch.cat([torch.randperm(100, generator=gen)[:10] + 100 * p for p in range(3)])
    scores[hot] += 5.0
    cfg = MaxStepPolicy(method="mixture", groups=2)  # Gaussian clusters: the mixture's own model
    w = infer_groups(scores, cfg, prompt_ids)
    assert w.shape == (300, 6)
    for p in range(3):
        rows = prompt_ids == p
        outside = torch.ones(6, dtype=torch.bool)
        outside[2 * p : 2 * p + 2] = False
        assert float(w[rows][:, outside].abs().sum()) == 0.0
        torch.testing.assert_close(w[rows][:, 2 * p : 2 * p + 2].sum(1), torch.ones(100))
        # each prompt's high group is its own planted cluster
        high = w[hot[10 * p : 10 * (p + 1)], 2 * p + 1]
        assert float(high.mean()) > 0.9
    pooled = infer_groups(scores, dataclasses.replace(cfg, per_prompt=False), prompt_ids)
    assert pooled.shape == (300, 2)
    # too few samples per prompt for K groups: falls back to pooled groups
    few = infer_groups(scores[:30], cfg, torch.arange(3).repeat_interleave(10))
    assert few.shape == (30, 2)
