"""The max step: per-sample losses, aggregation, environment inference, saving W."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from invdiff.environments import (
    LossError,
    aggregate_losses,
    collect_losses,
    environment_diagnostics,
    infer_environments,
    load_environments,
    project_simplex_rows,
    save_environments,
    timestep_grid,
)
from invdiff.io import CheckpointError
from invdiff.models.base import training_target
from invdiff.config import DebiasConfig
from invdiff.environments import environment_weights


# ----------------------------------------------------------------------------- t grid


def test_timestep_grid():
    assert timestep_grid(4).tolist() == [125, 375, 625, 875]
    assert timestep_grid(1).tolist() == [500]
    assert timestep_grid(2, num_train_timesteps=100).tolist() == [25, 75]
    g = timestep_grid(10)
    assert g.dtype == torch.int64 and g.tolist() == [50 + 100 * i for i in range(10)]
    with pytest.raises(ValueError, match=">= 1"):
        timestep_grid(0)


# ----------------------------------------------------------------------------- infer_environments


@pytest.fixture(scope="module")
def planted():
    gen = torch.Generator().manual_seed(0)
    scores = torch.randn(200, generator=gen)
    hot = torch.randperm(200, generator=gen)[:20]
    scores[hot] += 3.0
    return scores, hot


def test_infer_environments_finds_planted_high_loss_subgroup(planted):
    scores, hot = planted
    w = infer_environments(scores, 2, steps=300)
    means = (w * scores[:, None]).sum(0) / w.sum(0)
    high = int(means.argmax())
    share_hot = float(w[hot, high].sum() / w[hot].sum())
    rest = torch.ones(200, dtype=torch.bool)
    rest[hot] = False
    assert share_hot > 0.9, share_hot
    # ... and the high group is enriched for them, not just everything
    assert float(w[hot, high].mean()) > 2 * float(w[rest, high].mean())
    assert float(means[high] - means[1 - high]) > 1.0


@pytest.mark.parametrize("k", [2, 5])
def test_environment_rows_are_on_the_simplex(planted, k):
    scores, _ = planted
    w = infer_environments(scores, k, steps=50, seed=3)
    assert w.shape == (200, k)
    assert float(w.min()) >= 0.0
    torch.testing.assert_close(w.sum(1), torch.ones(200), rtol=0, atol=1e-5)


def test_infer_environments_is_deterministic_and_seeded(planted):
    scores, _ = planted
    a = infer_environments(scores, 3, steps=30, seed=1)
    assert torch.equal(a, infer_environments(scores, 3, steps=30, seed=1))
    assert not torch.equal(a, infer_environments(scores, 3, steps=30, seed=2))


def test_infer_environments_spreads_group_means(planted):
    scores, _ = planted
    w0 = infer_environments(scores, 2, steps=0)
    w = infer_environments(scores, 2, steps=100)
    spread = lambda w: float(((w * scores[:, None]).sum(0) / w.sum(0)).std())  # noqa: E731
    assert spread(w) > 5 * spread(w0)


def test_infer_environments_alpha_term(planted):
    scores, _ = planted
    plain = infer_environments(scores, 2, steps=20)
    with_alpha = infer_environments(scores, 2, steps=20, alpha=5.0)
    assert not torch.equal(plain, with_alpha)
    torch.testing.assert_close(with_alpha.sum(1), torch.ones(200), rtol=0, atol=1e-5)


@pytest.mark.parametrize("k", [0, 1, 6])
def test_infer_environments_rejects_bad_group_count(k):
    with pytest.raises(ValueError, match=r"K must be in \[2, N=5\]"):
        infer_environments(torch.arange(5.0), k, steps=1)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_infer_environments_rejects_non_finite_scores(bad):
    scores = torch.arange(10.0)
    scores[3] = bad
    with pytest.raises(LossError, match="NaN or inf"):
        infer_environments(scores, 2, steps=1)


def test_project_simplex_rows():
    w = torch.tensor([[2.0, -1.0, 2.0], [-1.0, -2.0, 0.0], [0.2, 0.3, 0.5]])
    out = project_simplex_rows(w)
    torch.testing.assert_close(out, torch.tensor([[0.5, 0.0, 0.5], [1 / 3, 1 / 3, 1 / 3], [0.2, 0.3, 0.5]]))


def test_environment_diagnostics():
    w = torch.tensor([[1.0, 0.0], [0.5, 0.5], [0.0, 1.0]])
    d = environment_diagnostics(w, torch.tensor([1.0, 2.0, 4.0]))
    assert d["group_sizes"] == pytest.approx([1.5, 1.5])
    assert d["group_mean_scores"] == pytest.approx([2.0 / 1.5, 5.0 / 1.5])


# ----------------------------------------------------------------------------- aggregation


def _two_prompts(n=12, t=3):
    gen = torch.Generator().manual_seed(0)
    base = torch.rand(n, t, generator=gen)
    offset = torch.tensor([5.0, 10.0, 2.0])[:t]
    losses = torch.cat([base, base * 3 + offset])  # prompt 1: other scale and offset per t
    prompt_ids = torch.tensor([0] * n + [1] * n)
    return base, losses, prompt_ids


def test_zscore_removes_per_prompt_offsets():
    base, losses, prompt_ids = _two_prompts()
    z = aggregate_losses(losses, prompt_ids, "zscore")
    assert z.shape == (24,) and z.dtype == torch.float32
    torch.testing.assert_close(z[:12], z[12:], rtol=0, atol=1e-5)
    for p in (0, 1):
        assert abs(float(z[prompt_ids == p].mean())) < 1e-6
    # ... while the plain mean ranks every prompt-1 sample above every prompt-0 sample
    m = aggregate_losses(losses, prompt_ids, "mean")
    assert float(m[12:].min()) > float(m[:12].max())


def test_zscore_manual_value():
    losses = torch.tensor([[1.0, 10.0], [3.0, 30.0], [5.0, 20.0]])
    # per t: column 0 mean 3, population std sqrt(8/3); column 1 mean 20, std sqrt(200/3)
    s0, s1 = (8 / 3) ** 0.5, (200 / 3) ** 0.5
    expected = torch.tensor([(-2 / s0 - 10 / s1) / 2, (0 + 10 / s1) / 2, (2 / s0 + 0) / 2])
    torch.testing.assert_close(aggregate_losses(losses, None, "zscore"), expected)
    torch.testing.assert_close(aggregate_losses(losses, torch.zeros(3, dtype=torch.long), "zscore", min_per_prompt=1), expected)


def test_zscore_pools_rare_prompts():
    base, losses, prompt_ids = _two_prompts(n=4)  # 4 < min_per_prompt=8 per prompt: pooled
    pooled = aggregate_losses(losses, prompt_ids, "zscore")
    assert torch.allclose(pooled, aggregate_losses(losses, None, "zscore"))
    assert not torch.allclose(pooled[:4], pooled[4:], atol=1e-3)
    per_prompt = aggregate_losses(losses, prompt_ids, "zscore", min_per_prompt=2)
    torch.testing.assert_close(per_prompt[:4], per_prompt[4:], rtol=0, atol=1e-5)


def test_mean_is_plain_mean():
    gen = torch.Generator().manual_seed(1)
    losses = torch.rand(9, 4, generator=gen)
    torch.testing.assert_close(aggregate_losses(losses, torch.arange(9) % 2, "mean"), losses.mean(1))


def test_high_noise_uses_last_timesteps():
    gen = torch.Generator().manual_seed(2)
    losses = torch.rand(10, 10, generator=gen)
    hn = aggregate_losses(losses, None, "high-noise", high_noise_fraction=0.3)
    only_last = aggregate_losses(losses[:, -3:], None, "zscore")
    torch.testing.assert_close(hn, only_last)


def test_aggregate_rejects_unknown_method_and_non_finite():
    with pytest.raises(ValueError, match="unknown aggregation 'median'"):
        aggregate_losses(torch.ones(3, 2), None, "median")
    bad = torch.ones(3, 2)
    bad[1, 1] = float("nan")
    with pytest.raises(LossError):
        aggregate_losses(bad, None, "mean")


# ----------------------------------------------------------------------------- save / load


def test_save_load_environments_roundtrip_and_reorder(tmp_path):
    gen = torch.Generator().manual_seed(0)
    w = project_simplex_rows(torch.rand(6, 3, generator=gen))
    ids = torch.tensor([10, 3, 7, 42, 0, 5])
    scores = torch.randn(6, generator=gen)
    path = str(tmp_path / "env.safetensors")
    save_environments(path, w, ids, scores, {"groups": 3})
    data = load_environments(path)
    assert torch.equal(data["weights"], w) and torch.equal(data["sample_ids"], ids) and torch.equal(data["scores"], scores)
    # reordered (and a subset) by the sample ids of another dataset view
    want = torch.tensor([0, 42, 10, 5])
    pos = [ids.tolist().index(s) for s in want.tolist()]
    re = load_environments(path, want)
    assert torch.equal(re["sample_ids"], want)
    assert torch.equal(re["weights"], w[pos])
    assert torch.equal(re["scores"], scores[pos])
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        assert '"groups": 3' in f.metadata()["invdiff"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["env.safetensors"]  # no temp files left


def test_load_environments_missing_ids(tmp_path):
    path = str(tmp_path / "env.safetensors")
    save_environments(path, torch.full((3, 2), 0.5), torch.tensor([1, 2, 3]), torch.zeros(3), {})
    with pytest.raises(CheckpointError, match=r"no weights for sample ids \[9, 4\] \(of 2\)"):
        load_environments(path, torch.tensor([1, 9, 4]))


def test_load_environments_corrupt_or_missing_file(tmp_path):
    path = tmp_path / "env.safetensors"
    path.write_bytes(b"\x00\xffgarbage, not a safetensors file" * 3)
    with pytest.raises(CheckpointError, match="environment weights at .* is corrupt"):
        load_environments(str(path))
    with pytest.raises(CheckpointError, match="environment weights not found"):
        load_environments(str(tmp_path / "absent.safetensors"))


def test_load_environments_wrong_content(tmp_path):
    from safetensors.torch import save_file

    path = str(tmp_path / "other.safetensors")
    save_file({"something": torch.zeros(2)}, path)
    with pytest.raises(CheckpointError, match="no 'weights' tensor"):
        load_environments(path)


# ----------------------------------------------------------------------------- with the tiny base

SMALL = DebiasConfig(groups=2, loss_timesteps=2, loss_draws=1, max_step_steps=20)


def test_environment_weights_do_not_see_attribute_labels(frozen_tiny_base, tiny_train):
    w, scores, losses, grid = environment_weights(frozen_tiny_base, tiny_train, SMALL, progress=False)
    assert w.shape == (len(tiny_train), 2) and losses.shape == (len(tiny_train), 2)
    assert grid.tolist() == [250, 750]
    gen = torch.Generator().manual_seed(0)
    shuffled = {k: v[torch.randperm(v.numel(), generator=gen)] for k, v in tiny_train.attributes.items()}
    assert not torch.equal(shuffled["color"], tiny_train.attributes["color"])
    other = {"color": 1 - tiny_train.attributes["color"], "digit": tiny_train.attributes["digit"]}
    for attrs in (shuffled, other, None):
        view = dataclasses.replace(tiny_train, attributes=attrs)
        w2, s2, l2, _ = environment_weights(frozen_tiny_base, view, SMALL, progress=False)
        assert torch.equal(w2, w)
        assert torch.equal(s2, scores)
        assert torch.equal(l2, losses)


def test_collect_losses_independent_of_batch_size(frozen_tiny_base, tiny_train):
    a, grid = collect_losses(frozen_tiny_base, tiny_train, num_timesteps=2, draws=2, batch_size=7, progress=False)
    b, _ = collect_losses(frozen_tiny_base, tiny_train, num_timesteps=2, draws=2, batch_size=64, progress=False)
    assert a.shape == (len(tiny_train), 2)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_collect_losses_independent_of_order_and_subset(frozen_tiny_base, tiny_train):
    full, _ = collect_losses(frozen_tiny_base, tiny_train, num_timesteps=2, draws=1, progress=False)
    idx = torch.tensor([30, 2, 71, 15, 0])
    sub, _ = collect_losses(frozen_tiny_base, tiny_train.subset(idx), num_timesteps=2, draws=1, progress=False)
    torch.testing.assert_close(sub, full[idx], rtol=0, atol=1e-6)
    seeded, _ = collect_losses(frozen_tiny_base, tiny_train.subset(idx), num_timesteps=2, draws=1, seed=1, progress=False)
    assert not torch.allclose(seeded, sub)


def test_collect_losses_matches_a_manual_evaluation(frozen_tiny_base, tiny_train):
    """The loss is against the model's own target (v for the default v-prediction base), not the
    clean image as in the official code."""
    base = frozen_tiny_base
    assert base.scheduler.config.prediction_type == "v_prediction"
    idx = torch.tensor([4, 9])
    ds = tiny_train.subset(idx)
    losses, grid = collect_losses(base, ds, num_timesteps=2, draws=2, seed=3, progress=False)
    for row in range(2):
        sid = int(ds.sample_ids[row])
        bank = torch.randn((4, *ds.images.shape[1:]), generator=torch.Generator().manual_seed(3 * 1_000_003 + sid))
        for j, t in enumerate(grid.tolist()):
            per_draw = []
            for d in range(2):
                noise = bank[j * 2 + d : j * 2 + d + 1]
                tt = torch.tensor([t])
                x0 = ds.images[row : row + 1]
                x_t = base.scheduler.add_noise(x0, noise, tt)
                target = training_target(base.scheduler, x0, noise, tt)
                torch.testing.assert_close(target, base.scheduler.get_velocity(x0, noise, tt))
                assert not torch.allclose(target, x0)
                with torch.no_grad():
                    pred = base.eps(x_t, tt, base.prompt_embeds(ds.prompt_ids[row : row + 1]))
                per_draw.append(float(((pred - target) ** 2).mean()))
            assert float(losses[row, j]) == pytest.approx(sum(per_draw) / 2, rel=1e-5)


def test_collect_losses_non_finite_model_output(frozen_tiny_base, tiny_train, monkeypatch):
    monkeypatch.setattr(frozen_tiny_base, "eps", lambda x, t, e: torch.full_like(x, float("nan")))
    with pytest.raises(LossError, match="non-finite losses"):
        collect_losses(frozen_tiny_base, tiny_train.subset(torch.arange(3)), num_timesteps=1, draws=1, progress=False)
