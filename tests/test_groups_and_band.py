"""The default max step (the widest-gap cut), G's t band, the recipes and their bad inputs."""
import dataclasses

import pytest
import torch

from invdiff.environments import (
    MaxStepPolicy,
    draw_proposal,
    groups_from_losses,
    guidance_band,
    infer_environments_gap,
    infer_environments_mixture,
)
from invdiff.metrics import group_alignment
from invdiff.models.guidance import GuidanceModule, in_band
from invdiff.config import RECIPES, DebiasConfig, recipe_config
from invdiff.environments import weights_from_losses


def _planted_90_10(n=400, seed=0, spread=1.0):
    """A 1-D score: 90% majority ~ |N(0, spread^2)| (skewed, with an upper tail, like a real
    loss), 10% minority a tight cluster above it."""
    gen = torch.Generator().manual_seed(seed)
    minority = torch.zeros(n, dtype=torch.bool)
    minority[torch.randperm(n, generator=gen)[: n // 10]] = True
    majority_scores = torch.randn(n, generator=gen).abs() * spread
    minority_scores = 5.0 * spread + 0.3 * torch.randn(n, generator=gen)
    return torch.where(minority, minority_scores, majority_scores), minority


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gap_cut_recovers_a_planted_10_percent_minority(seed):
    scores, minority = _planted_90_10(seed=seed)
    w = infer_environments_gap(scores, 2)
    assert w.shape == (400, 2) and torch.equal(w.sum(1), torch.ones(400))
    high = w[:, 1].bool()  # groups are ordered by score
    assert torch.equal(high, minority)
    # equal weight per group then gives the minority (close to) half the weight
    share = group_alignment(w, scores, minority, minority.long())["balanced_minority_share"]
    assert share > 0.45, share


@pytest.mark.parametrize("seed", range(5))
def test_gap_cut_beats_the_mixture_on_a_skewed_majority(seed):
    """The shape of the real scores: a log-normal majority and a broad minority above it. The
    mixture's high component also takes the majority's upper tail; the gap cut's high group is
    (almost) only minority samples."""
    gen = torch.Generator().manual_seed(seed)
    minority = torch.zeros(400, dtype=torch.bool)
    minority[torch.randperm(400, generator=gen)[:40]] = True
    majority_scores = torch.exp(0.6 * torch.randn(400, generator=gen))
    minority_scores = 6.0 + 1.5 * torch.randn(400, generator=gen).abs()
    scores = torch.where(minority, minority_scores, majority_scores)
    gap = group_alignment(infer_environments_gap(scores, 2), scores, minority, minority.long())
    mix = group_alignment(infer_environments_mixture(scores, 2), scores, minority, minority.long())
    assert gap["balanced_minority_share"] > mix["balanced_minority_share"]
    assert gap["group_minority_fraction"][1] > 0.95


def test_gap_cut_with_more_groups_and_few_samples():
    scores = torch.tensor([0.0, 0.1, 0.2, 0.3, 5.0, 5.1, 9.0, 9.2])
    w = infer_environments_gap(scores, 3)
    assert w.argmax(1).tolist() == [0, 0, 0, 0, 1, 1, 2, 2]
    tiny = infer_environments_gap(torch.tensor([0.0, 1.0]), 2)  # every gap is searched when there are few
    assert tiny.argmax(1).tolist() == [0, 1]
    with pytest.raises(ValueError, match="number of groups"):
        infer_environments_gap(scores, 9)


def test_policy_is_validated():
    with pytest.raises(ValueError, match="max_step"):
        MaxStepPolicy(method="kmeans").validate()
    with pytest.raises(ValueError, match="aggregation"):
        groups_from_losses(torch.rand(20, 4), None, MaxStepPolicy(aggregation="median"))


def _losses_with_a_high_t_minority(n_per_prompt=40, prompts=2, t=10):
    """(N, T) losses where minority samples differ only in the top 3 timesteps."""
    gen = torch.Generator().manual_seed(0)
    losses = 1.0 + 0.05 * torch.rand(n_per_prompt * prompts, t, generator=gen)
    minority = torch.zeros(n_per_prompt * prompts, dtype=torch.bool)
    minority[::10] = True
    losses[minority, -3:] += 2.0
    return losses, torch.arange(prompts).repeat_interleave(n_per_prompt), minority


def test_guidance_band_is_where_samples_disagree():
    losses, prompt_ids, _ = _losses_with_a_high_t_minority()
    assert guidance_band(losses, prompt_ids, 1000) == 700  # the top 3 of 10 bins
    flat = torch.ones(30, 5) + 0.01 * torch.rand(30, 5, generator=torch.Generator().manual_seed(1))
    assert guidance_band(flat, None, 1000) < 1000


def test_default_max_step_finds_the_minority_from_losses():
    losses, prompt_ids, minority = _losses_with_a_high_t_minority()
    w, scores = groups_from_losses(losses, prompt_ids, MaxStepPolicy())
    assert w.shape == (80, 4)
    high = w.view(80, 2, 2)[:, :, 1].sum(1).bool()
    # otsu (the default) takes the whole minority, and with a uniform majority a few of its top
    # samples too (its precision is below the gap cut's; docs/dev_runs section 3)
    assert bool(high[minority].all()) and int(high.sum()) <= 2 * int(minority.sum())
    # the gap cut, on a minority this far apart, takes exactly the minority
    w_gap, _ = groups_from_losses(losses, prompt_ids, MaxStepPolicy(method="gap"))
    assert torch.equal(w_gap.view(80, 2, 2)[:, :, 1].sum(1).bool(), minority)


def test_proposal_restricted_to_the_band():
    losses, prompt_ids, _ = _losses_with_a_high_t_minority()
    band = torch.arange(10) >= 7
    q = draw_proposal(losses, prompt_ids, draws=1, mix=0.5, band=band)
    assert float(q[:7].sum()) == 0.0 and abs(float(q.sum()) - 1.0) < 1e-6
    with pytest.raises(ValueError, match="band"):
        draw_proposal(losses, prompt_ids, draws=1, band=torch.zeros(10, dtype=torch.bool))


def test_g_is_zero_outside_its_band(frozen_tiny_base):
    g = GuidanceModule.from_frozen(frozen_tiny_base.unet.config, "tiny", t_min=500)
    torch.nn.init.normal_(g.unet.conv_out.weight)  # a G that is non-zero wherever it acts
    x = torch.randn(4, 3, 16, 16)
    t = torch.tensor([100, 499, 500, 900])
    e = frozen_tiny_base.prompt_embeds(torch.zeros(4, dtype=torch.long))
    with torch.no_grad():
        out = g(x, t, e, torch.randn_like(x))
    norms = out.flatten(1).norm(dim=1)
    assert norms[:2].tolist() == [0.0, 0.0] and bool((norms[2:] > 0).all())
    assert in_band(torch.tensor(600), 500, 3).tolist() == [True, True, True]
    assert g.t_min == 500 and GuidanceModule.from_frozen(frozen_tiny_base.unet.config, "tiny").t_min == 0
    with pytest.raises(ValueError, match="t_min"):
        GuidanceModule.from_frozen(frozen_tiny_base.unet.config, "tiny", t_min=-1)


@pytest.mark.parametrize("ratio", [0.5, 1.0, 2.0])
def test_outside_its_band_g_combines_to_the_frozen_eps_at_every_ratio(frozen_tiny_base, ratio):
    # For r <= 1 the combine interpolates (r*g + (1-r)*eps): a zeroed G there would give
    # (1-r)*eps, a scaled-down frozen prediction, not the frozen model.
    g = GuidanceModule.from_frozen(frozen_tiny_base.unet.config, "tiny", ratio=ratio, t_min=500)
    torch.nn.init.normal_(g.unet.conv_out.weight)
    x = torch.randn(4, 3, 16, 16)
    t = torch.tensor([100, 499, 500, 900])
    e = frozen_tiny_base.prompt_embeds(torch.zeros(4, dtype=torch.long))
    eps = torch.randn_like(x)
    with torch.no_grad():
        combined = g.combine(eps, g(x, t, e, eps))
    tol = 4 * torch.finfo(eps.dtype).eps * float(eps.abs().max())  # r*eps + (1-r)*eps rounds
    assert float((combined[:2] - eps[:2]).abs().max()) <= tol
    assert float((combined[2:] - eps[2:]).abs().amax(dim=(1, 2, 3)).min()) > 1e-3  # G acts in the band


@pytest.mark.parametrize("ratio", [0.5, 2.0])
def test_a_rows_output_does_not_depend_on_its_batch_across_the_band(frozen_tiny_base, ratio):
    # The engine batches requests at different steps: a row below G's band must get the frozen
    # eps whether the rest of its batch is in the band or not.
    from invdiff.sampling import GuidedDenoiser

    g = GuidanceModule.from_frozen(frozen_tiny_base.unet.config, "tiny", ratio=ratio, t_min=500)
    torch.nn.init.normal_(g.unet.conv_out.weight)
    d = GuidedDenoiser(frozen_tiny_base, g)
    x = torch.randn(2, 3, 16, 16)
    e = frozen_tiny_base.prompt_embeds(torch.zeros(2, dtype=torch.long))
    with torch.no_grad():
        mixed = d(x, torch.tensor([100, 900]), e)
        alone = d(x[:1], torch.tensor([100]), e[:1])
    # The frozen UNet itself rounds a little differently at batch 2 than at 1 (a few ulps); the
    # defect this guards against, (1-r)*eps below the band, is of the size of eps itself.
    tol = 64 * torch.finfo(x.dtype).eps * float(alone.abs().max())
    assert float((mixed[:1] - alone).abs().max()) <= tol


def test_sampler_skips_g_outside_its_band(frozen_tiny_base, monkeypatch):
    from invdiff.sampling import GuidedDenoiser

    g = GuidanceModule.from_frozen(frozen_tiny_base.unet.config, "tiny", t_min=500)
    seen = []
    real = g.forward
    monkeypatch.setattr(g, "forward", lambda x, t, *a: seen.append(t.tolist()) or real(x, t, *a))
    d = GuidedDenoiser(frozen_tiny_base, g)
    e = frozen_tiny_base.prompt_embeds(torch.zeros(3, dtype=torch.long))
    x = torch.randn(3, 3, 16, 16)
    eps, out = d.branches(x, torch.tensor([100, 200, 300]), e)
    assert out is None and seen == []
    eps, out = d.branches(x, torch.tensor([100, 600, 700]), e)
    assert seen == [[600, 700]] and out.shape == x.shape and float(out[0].abs().sum()) == 0.0


def test_recipes_and_their_settings():
    official = recipe_config("official")
    assert (official.max_step, official.aggregation, official.per_prompt_groups, official.lam_mode, official.lam,
            official.use_bank, official.importance_mix, official.t_band) == ("official", "mean", False, "absolute", 1.0,
                                                                             False, 1.0, "off")
    assert official.ratio == 0.5
    assert recipe_config("official", steps=7).steps == 7  # a flag given on top wins
    assert recipe_config("invdiff") == DebiasConfig()
    assert set(RECIPES) == {"invdiff", "official", "jtt", "groupdro"}
    with pytest.raises(ValueError, match="unknown recipe 'dro'"):
        recipe_config("dro")


def test_jtt_upweights_the_high_loss_group():
    losses, prompt_ids, minority = _losses_with_a_high_t_minority()
    w, _ = weights_from_losses(losses, prompt_ids, recipe_config("jtt", jtt_upweight=4.0))
    assert w.shape == (80, 1)
    assert torch.equal(w[:, 0], torch.where(minority, 4.0, 1.0))


@pytest.mark.parametrize("field,value,message", [
    ("t_band", "-5", "t band"), ("t_band", "early", "t band"), ("ema_decay", 1.0, "EMA decay"),
    ("ema_decay", 0.0, "EMA decay"), ("objective", "irm", "objective"), ("jtt_upweight", 0.5, "JTT upweight"),
    ("importance_mix", 0.0, "importance mix"), ("max_step", "psychic", "max_step"),
])
def test_bad_config_values_are_rejected_before_any_compute(field, value, message):
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(DebiasConfig(), **{field: value}).validate(100)


def test_band_outside_the_schedule_is_rejected():
    with pytest.raises(ValueError, match=r"outside \[0, 1000\)"):
        DebiasConfig(t_band="1000").validate_for_base(1000)
    DebiasConfig(t_band="999").validate_for_base(1000)


def test_groupdro_weights_give_the_q_weighted_group_risks():
    from invdiff.training import _groupdro_weights

    gen = torch.Generator().manual_seed(0)
    w = torch.nn.functional.one_hot(torch.tensor([0, 0, 1, 1, 1, 2]), 4).float()  # group 3 empty in the batch
    q = torch.tensor([0.1, 0.2, 0.3, 0.4])
    losses = torch.rand(6, generator=gen)
    v = _groupdro_weights(w, q)
    risks = (w * losses[:, None]).sum(0) / w.sum(0).clamp_min(1e-12)
    present = w.sum(0) > 0
    expected = (q[present] * risks[present]).sum() / q[present].sum()
    torch.testing.assert_close((v[:, 0] * losses).sum() / v.sum(), expected)


@pytest.mark.parametrize("objective,ema", [("groupdro", None), ("invariant", 0.9)])
def test_min_step_objectives_and_ema_train(frozen_tiny_base, tiny_train, objective, ema):
    from invdiff.environments import collect_losses
    from invdiff.training import MinStepConfig, train_guidance

    _, _, bank = collect_losses(frozen_tiny_base, tiny_train, num_timesteps=2, draws=1, progress=False, return_bank=True)
    weights = torch.nn.functional.one_hot(tiny_train.prompt_ids % 2, 2).float()
    torch.manual_seed(0)
    g = GuidanceModule.from_frozen(frozen_tiny_base.unet.config, "tiny")
    start = [p.detach().clone() for p in g.parameters()]
    cfg = MinStepConfig(steps=4, batch_size=8, lr=1e-2, lam_mode="absolute", objective=objective, ema_decay=ema)
    log = train_guidance(frozen_tiny_base, g, tiny_train, weights, cfg, progress=False, bank=bank)
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in log[:-1])
    moved = sum(float((p.detach() - s).abs().sum()) for p, s in zip(g.parameters(), start))
    assert moved > 0
    with pytest.raises(ValueError, match="objective"):
        train_guidance(frozen_tiny_base, g, tiny_train, weights, MinStepConfig(steps=1, objective="irm"), progress=False)


def test_head_kinds_and_a_g_without_its_body(frozen_tiny_base, tmp_path):
    cfg = frozen_tiny_base.unet.config
    x = torch.randn(2, 3, 16, 16)
    t = torch.tensor([900, 100])
    e = frozen_tiny_base.prompt_embeds(torch.zeros(2, dtype=torch.long))
    grey = torch.ones(2, 3, 16, 16) * torch.randn(2, 1, 16, 16)  # every channel equal
    torch.manual_seed(0)
    zs = GuidanceModule.from_frozen(cfg, "tiny", body=False, head_kind="zero-sum")
    torch.nn.init.normal_(zs.head[-1].weight)
    torch.nn.init.normal_(zs.head[-1].bias)
    with torch.no_grad():
        assert float(zs(x, t, e, grey).abs().max()) < 1e-5  # grey pixels are left alone
        assert float(zs(x, t, e, torch.randn_like(x)).abs().max()) > 0
    assert zs.unet is None
    zs.save_pretrained(tmp_path / "g")
    again = GuidanceModule.from_pretrained(tmp_path / "g")
    with torch.no_grad():
        torch.testing.assert_close(again(x, t, e, x), zs(x, t, e, x))
    stats = GuidanceModule.from_frozen(cfg, "tiny", head_sees_sample=True)
    with torch.no_grad():
        assert stats(x, t, e, x).shape == x.shape
    with pytest.raises(ValueError, match="recalibration head"):
        GuidanceModule.from_frozen(cfg, "tiny", head_kind="mlp")
    with pytest.raises(ValueError, match="without its UNet body"):
        GuidanceModule.from_frozen(cfg, "tiny", body=False, head_kind="none")
