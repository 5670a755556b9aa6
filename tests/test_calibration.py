"""The label-free calibration of the push (invdiff/calibration.py, models/prompt_gains.py)."""
import json
import os

import pytest
import torch

from invdiff.calibration import SEPARATION_TRUST, _monotone, balance_strength, readout_reference
from invdiff.environments import aggregate_losses
from invdiff.model_folders import RUN_META
from invdiff.models.prompt_gains import MATCH_TOLERANCE, PromptGains, correction_gain_input, prompt_keys
from invdiff.ops.reference import guidance_combine


def test_monotone_pools_adjacent_violators():
    assert _monotone([0.1, 0.3, 0.2, 0.5]) == pytest.approx([0.1, 0.25, 0.25, 0.5])
    assert _monotone([0.4, 0.3, 0.2]) == pytest.approx([0.3, 0.3, 0.3])
    assert _monotone([0.1, 0.2]) == [0.1, 0.2]


@pytest.mark.parametrize("shares, base, expected, status", [
    ([0.2, 0.4, 0.6, 0.8], 0.1, 1.25, "reached"),  # between s = 1 (0.4) and 1.5 (0.6)
    ([0.6, 0.7, 0.8, 0.9], 0.1, 0.5 * 0.4 / 0.5, "reached"),  # between the anchor s = 0 (0.1) and s = 0.5
    ([0.12, 0.2, 0.3, 0.4], 0.1, 2.0, "short"),  # never reaches 0.5: the largest strength
    ([0.1, 0.11, 0.1, 0.12], 0.1, 1.0, "no push"),  # G does not move the readout
    ([0.6, 0.7, 0.8, 0.9], 0.55, 0.0, "already"),  # the data already reads at or above the target
])
def test_balance_strength(shares, base, expected, status):
    strength, got = balance_strength([0.5, 1.0, 1.5, 2.0], shares, base, 0.5)
    assert got == status and strength == pytest.approx(expected)


def test_balance_strength_is_not_fooled_by_a_dip():
    # noise makes 1.5 read below 1.0; the monotone fit pools them rather than crossing twice
    strength, status = balance_strength([0.5, 1.0, 1.5, 2.0], [0.2, 0.45, 0.35, 0.7], 0.1, 0.5)
    assert status == "reached" and 1.5 < strength < 2.0


@pytest.mark.parametrize("ratio", [0.5, 1.0, 2.0])
def test_a_gain_scales_the_combined_correction_exactly(ratio):
    eps, g = torch.randn(3, 2, 4, 4, dtype=torch.float64), torch.randn(3, 2, 4, 4, dtype=torch.float64)
    gain = torch.tensor([0.0, 1.0, 1.7], dtype=torch.float64)
    scaled = correction_gain_input(g, eps, gain, ratio)
    want = eps + gain.view(-1, 1, 1, 1) * (guidance_combine(eps, g, ratio) - eps)
    torch.testing.assert_close(guidance_combine(eps, scaled, ratio), want)


def test_prompt_gains_match_their_prompts_and_fall_back_to_the_default():
    embeds = torch.randn(3, 4, 8)
    gains = PromptGains({"keys": prompt_keys(embeds[:2]).tolist(), "gains": [2.0, 0.5], "default": 1.25})
    assert gains(embeds).tolist() == [2.0, 0.5, 1.25]
    # the same prompt from a 16-bit text encoder is still recognised
    assert gains(embeds.to(torch.bfloat16)).tolist() == [2.0, 0.5, 1.25]
    # a prompt whose embedding differs by more than the tolerance is another prompt
    other = embeds[:1] + 10 * MATCH_TOLERANCE * embeds[:1].abs().mean()
    assert gains(other).tolist() == [1.25]
    assert not PromptGains(None).active and torch.equal(PromptGains(None)(embeds), torch.ones(3))


@pytest.mark.parametrize("record", [
    {"keys": [[0.0] * 5], "gains": [1.0]},  # a key of the wrong length
    {"keys": [], "gains": [1.0]},  # a gain without a key
    {"keys": [], "gains": [], "default": -1.0},
    {"keys": [], "gains": [], "default": float("nan")},
])
def test_malformed_gains_in_a_config_are_refused(record):
    with pytest.raises(ValueError, match="prompt_gains"):
        PromptGains(record)


def test_the_readout_scores_training_data_as_the_max_step_does_and_cuts_a_planted_minority():
    gen = torch.Generator().manual_seed(0)
    ids = torch.arange(3).repeat_interleave(100)
    losses = torch.rand(300, 6, generator=gen) * 0.1 + 1.0
    minority = torch.zeros(300, dtype=torch.bool)
    for p in range(3):
        minority[p * 100 : p * 100 + 10] = True  # 10% per prompt, far above the rest at high t
    losses[minority, 3:] += 1.0
    ref = readout_reference(losses, ids, "spread", 2)
    torch.testing.assert_close(ref.scores(losses, ids), aggregate_losses(losses, ids, "spread"))
    assert torch.equal(ref.reads_high(losses, ids), minority)
    assert ref.base_share.tolist() == pytest.approx([0.1] * 3)
    assert bool((ref.separation > 5 * SEPARATION_TRUST).all())
    # one normal population (or a heavier-tailed one), 140 samples per prompt like the digits: no
    # separate group, and the median prompt stays under the trust line
    for draw in (lambda n: torch.randn(n, generator=gen), lambda n: torch.distributions.StudentT(5).sample((n,))):
        torch.manual_seed(0)
        scores = torch.stack([draw(140) for _ in range(20)]).flatten()
        ids = torch.arange(20).repeat_interleave(140)
        ref = readout_reference(scores[:, None].repeat(1, 3) + 5.0, ids, "mean", 2)
        assert 1.8 < float(ref.separation.median()) < 2.8 and float(ref.separation.median()) < SEPARATION_TRUST


def test_a_calibrated_g_at_strength_one_equals_the_uncalibrated_g_at_its_gain(tiny_base_dir):
    from invdiff.models.base import FrozenBase
    from invdiff.models.guidance import GuidanceModule
    from invdiff.sampling import GuidedDenoiser, sample

    base = FrozenBase.from_pretrained(tiny_base_dir).freeze()
    torch.manual_seed(0)
    g = GuidanceModule.from_frozen(base.unet.config, "tiny", 2.0)
    torch.nn.init.normal_(g.unet.conv_out.weight, std=0.05)  # a G that pushes at all
    ids = torch.tensor([3, 3, 5])
    plain = sample(GuidedDenoiser(base, g, 1.7), ids[:2], [0, 1], 3, progress=False)
    keys = prompt_keys(base.prompt_embeds(torch.tensor([3])))
    g.set_prompt_gains({"keys": keys.tolist(), "gains": [1.7], "default": 1.0})
    calibrated = sample(GuidedDenoiser(base, g, 1.0), ids, [0, 1, 2], 3, progress=False)
    torch.testing.assert_close(calibrated[:2], plain, rtol=1e-4, atol=1e-5)
    # prompt 5 was not calibrated: the default gain 1, as uncalibrated
    g.set_prompt_gains(None)
    torch.testing.assert_close(calibrated[2:], sample(GuidedDenoiser(base, g, 1.0), ids[2:], [2], 3, progress=False),
                               rtol=1e-4, atol=1e-5)


def test_debias_records_the_calibration_and_the_saved_g_carries_its_gains(tiny_base_dir, tiny_train, tmp_path, monkeypatch):
    import invdiff.calibration as calibration
    from invdiff.config import DebiasConfig
    from invdiff.debiasing import debias
    from invdiff.model_folders.load import load_model

    # The tiny base's scores show no separate group; the trusted path is what this test checks.
    monkeypatch.setattr(calibration, "SEPARATION_TRUST", 0.0)
    run = str(tmp_path / "run")
    config = DebiasConfig(steps=2, batch_size=8, loss_timesteps=2, min_per_prompt_groups=2)
    result = debias(tiny_base_dir, tiny_train, run, config, progress=False)
    record = result["meta"]["calibration"]
    with open(os.path.join(run, RUN_META)) as f:
        assert json.load(f)["calibration"] == json.loads(json.dumps(record))
    assert record["target"] == 0.5 and record["strengths"] == list(calibration.CALIBRATION_STRENGTHS)
    _, guidance = load_model(run)
    saved = guidance.config.prompt_gains
    if record["mode"] == "per-prompt":
        assert saved["gains"] == [entry["gain"] for entry in record["prompts"].values()]
        for entry in record["prompts"].values():
            assert entry["status"] in ("reached", "short", "no push", "already")
            assert len(entry["readout_shares"]) == len(record["strengths"])
    assert saved["default"] == record["default_gain"]
    assert guidance.calibrated_gains.gains.tolist() == pytest.approx(saved["gains"])


def test_an_untrusted_readout_leaves_g_as_trained_with_one_warning(tiny_base_dir, tiny_train, tmp_path, monkeypatch):
    import invdiff.calibration as calibration
    from invdiff.config import DebiasConfig
    from invdiff.debiasing import debias
    from invdiff.model_folders.load import load_model

    monkeypatch.setattr(calibration, "SEPARATION_TRUST", 1e9)  # no score of the tiny base stands out this far
    calls = []
    monkeypatch.setattr(calibration, "_draw", lambda *a, **k: calls.append(a))
    run = str(tmp_path / "run")
    result = debias(tiny_base_dir, tiny_train, run, DebiasConfig(steps=2, batch_size=8, loss_timesteps=2), progress=False)
    record = result["meta"]["calibration"]
    assert record["mode"] == "untrusted" and record["default_gain"] == 1.0 and calls == []  # nothing sampled
    warnings = [w for w in result["meta"]["diagnostics"]["warnings"] if "not calibrated" in w]
    assert len(warnings) == 1 and "\n" not in warnings[0]
    _, guidance = load_model(run)
    assert not guidance.calibrated_gains.active


def test_no_calibrate_switch_and_the_official_recipe_skip_it(tiny_base_dir, tmp_path):
    from invdiff.cli import build_parser, debias_config_from_args

    args = build_parser().parse_args(["debias", "--base", tiny_base_dir, "--out", str(tmp_path / "r"), "--no-calibrate"])
    assert debias_config_from_args(args).calibrate is False
    args = build_parser().parse_args(["debias", "--base", tiny_base_dir, "--out", str(tmp_path / "r")])
    assert debias_config_from_args(args).calibrate is True
    args = build_parser().parse_args(["debias", "--base", tiny_base_dir, "--out", str(tmp_path / "r"), "--recipe", "official"])
    assert debias_config_from_args(args).calibrate is False


def test_band_limited_gains_leave_g_as_trained_below_the_band():
    embeds = torch.randn(4, 2, 8)
    eps, g = torch.randn(4, 3, 2, 2), torch.randn(4, 3, 2, 2)
    gains = PromptGains({"keys": prompt_keys(embeds).tolist(), "gains": [2.0] * 4, "default": 1.0, "band_start": 600})
    out = gains.apply(g, eps, embeds, 2.0, torch.tensor([999, 600, 599, 0]))
    torch.testing.assert_close(out[:2], 2.0 * g[:2])
    torch.testing.assert_close(out[2:], g[2:])
    with pytest.raises(ValueError, match="timestep"):
        gains.apply(g, eps, embeds, 2.0)
    with pytest.raises(ValueError, match="band_start"):
        PromptGains({"keys": [], "gains": [], "band_start": -1})


def test_debias_prints_one_line_about_the_calibration():
    from invdiff.cli import describe_calibration

    per_prompt = {"target": 0.5, "mode": "per-prompt", "prompts": {"digit 0": {"gain": 1.25}, "digit 1": {"gain": 2.0}}}
    line = describe_calibration(per_prompt)
    assert "\n" not in line and "digit 0: 1.25" in line and "digit 1: 2.00" in line
    untrusted = {"target": 0.5, "mode": "untrusted", "separation": 2.71, "prompts": {}}
    assert describe_calibration(untrusted) == "push not calibrated (the high-loss group stands 2.7 robust sd out): G pushes as trained"
    pooled = {"target": 0.5, "mode": "pooled", "prompts": {}, "pooled": {"gain": 1.5, "prompts_sampled": 64}}
    assert "one gain 1.50 for every prompt (from 64 prompts)" in describe_calibration(pooled)


def test_more_prompts_than_the_cap_get_one_pooled_gain(tiny_base_dir, tiny_train, tmp_path, monkeypatch):
    import invdiff.calibration as calibration
    from invdiff.config import DebiasConfig
    from invdiff.debiasing import debias
    from invdiff.model_folders.load import load_model

    monkeypatch.setattr(calibration, "SEPARATION_TRUST", 0.0)
    monkeypatch.setattr(calibration, "MAX_CALIBRATED_PROMPTS", 3)  # the tiny data has 10 prompts
    run = str(tmp_path / "run")
    result = debias(tiny_base_dir, tiny_train, run, DebiasConfig(steps=2, batch_size=8, loss_timesteps=2), progress=False)
    record = result["meta"]["calibration"]
    assert record["mode"] == "pooled" and record["pooled"]["prompts_sampled"] == 3 and record["prompts"] == {}
    _, guidance = load_model(run)
    assert guidance.config.prompt_gains["keys"] == [] and guidance.config.prompt_gains["default"] == record["pooled"]["gain"]
