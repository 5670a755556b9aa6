"""invdiff.metrics: the paper's Bias, attribute counting, the colour predictor, diagnostics, FD."""
from __future__ import annotations

import math

import pytest
import torch

from invdiff.data.colored_digits import PALETTE, _digit_intensity, colored_digits, render
from invdiff.metrics import (
    DigitClassifier,
    attribute_counts,
    bias_per_prompt,
    bias_summary,
    evaluate_samples,
    frechet_distance,
    group_alignment,
    predict_color,
)


# ----------------------------------------------------------------------------- Bias


@pytest.mark.parametrize(
    "counts, expected",
    [
        ([[9, 1]], 0.8),  # |9-1| / 10 / 1
        ([[5, 5]], 0.0),
        ([[10, 0]], 1.0),
        ([[0, 7]], 1.0),
        ([[6, 2, 0]], 0.5),  # (4 + 6 + 2) / 8 / 3
        ([[3, 3, 3]], 0.0),
        ([[1, 2, 3, 4]], 10 / 10 / 6),  # pairs: 1+2+3+1+2+1 = 10, total 10, 6 pairs
    ],
)
def test_bias_hand_worked(counts, expected):
    out = bias_per_prompt(torch.tensor(counts))
    assert out.shape == (1,)
    assert float(out[0]) == pytest.approx(expected, abs=1e-12)


def test_bias_per_prompt_and_summary():
    counts = torch.tensor([[9, 1], [5, 5], [2, 8], [4, 0]])
    per = bias_per_prompt(counts)
    expected = [0.8, 0.0, 0.6, 1.0]
    assert per.tolist() == pytest.approx(expected, abs=1e-12)
    summary = bias_summary(counts)
    mean = sum(expected) / 4
    std = math.sqrt(sum((b - mean) ** 2 for b in expected) / 4)  # population std over prompts
    assert summary["bias"] == pytest.approx(0.6, abs=1e-12)
    assert summary["bias_std"] == pytest.approx(std, abs=1e-12)
    assert bias_summary(torch.tensor([[9, 1]])) == pytest.approx({"bias": 0.8, "bias_std": 0.0})


def test_bias_does_not_depend_on_scale_or_value_order():
    counts = torch.tensor([[6, 2, 0]])
    assert float(bias_per_prompt(counts * 7)) == pytest.approx(0.5)
    assert float(bias_per_prompt(counts[:, [2, 0, 1]])) == pytest.approx(0.5)


def test_bias_rejects_bad_counts():
    with pytest.raises(ValueError, match="at least two attribute values"):
        bias_per_prompt(torch.tensor([[5], [3]]))
    with pytest.raises(ValueError, match="at least one sample"):
        bias_per_prompt(torch.tensor([[5, 1], [0, 0]]))
    with pytest.raises(ValueError, match=r"\(P, K\)"):
        bias_per_prompt(torch.tensor([5, 1]))


# ----------------------------------------------------------------------------- counts


def test_attribute_counts():
    prompt_ids = torch.tensor([0, 0, 0, 1, 2, 2, 0])
    attrs = torch.tensor([0, 1, 1, 2, 0, 0, 2])
    counts = attribute_counts(prompt_ids, attrs, num_prompts=4, num_values=3)
    assert counts.tolist() == [[1, 2, 1], [0, 0, 1], [2, 0, 0], [0, 0, 0]]


def test_attribute_counts_rejects_out_of_range_values():
    # Value 2 with num_values=2 used to be counted silently as (prompt 1, value 0).
    with pytest.raises(ValueError, match="attribute values"):
        attribute_counts(torch.tensor([0, 0, 1]), torch.tensor([0, 2, 1]), 2, 2)
    with pytest.raises(ValueError, match="attribute values"):
        attribute_counts(torch.tensor([0, 1]), torch.tensor([-1, 1]), 2, 2)
    with pytest.raises(ValueError, match="prompt ids"):
        attribute_counts(torch.tensor([0, 2]), torch.tensor([0, 1]), 2, 2)


# ----------------------------------------------------------------------------- colour predictor


@pytest.mark.parametrize("num_colors", [2, 3, len(PALETTE)])
@pytest.mark.parametrize("resolution", [8, 16])
def test_predict_color_exact_on_clean_renders(num_colors, resolution):
    intensity, digits = _digit_intensity(resolution)
    idx = torch.arange(0, 1797, 37)  # 49 images, every digit
    colors = torch.arange(idx.numel()) % num_colors  # every colour of the palette prefix
    images = render(intensity[idx], colors)
    assert set(colors.tolist()) == set(range(num_colors))
    assert torch.equal(predict_color(images, num_colors), colors)


def test_predict_color_on_benchmark_data_matches_labels():
    ds = colored_digits("eval", num_colors=3, resolution=16)
    assert torch.equal(predict_color(ds.images, 3), ds.attributes["color"])


def test_predict_color_ignores_dim_background_noise():
    intensity, _ = _digit_intensity(16)
    colors = torch.tensor([0, 1, 2, 0, 1, 2])
    images = render(intensity[:6], colors)
    gen = torch.Generator().manual_seed(0)
    noisy = images + 0.02 * torch.randn(images.shape, generator=gen)
    assert torch.equal(predict_color(noisy, 3), colors)


# ----------------------------------------------------------------------------- alignment


def test_group_alignment_planted():
    # group 0 = samples 0..3 (holds both minority samples 0, 1), group 1 = samples 4..7
    weights = torch.tensor([[1.0, 0.0]] * 4 + [[0.0, 1.0]] * 4)
    minority = torch.tensor([True, True, False, False, False, False, False, False])
    scores = torch.tensor([3.0, 2.5, 0.1, 0.0, -0.2, 0.3, 0.2, -1.0])
    true_groups = torch.tensor([1, 1, 0, 0, 2, 2, 3, 3])
    out = group_alignment(weights, scores, minority, true_groups)
    assert out["group_sizes"] == [4.0, 4.0]
    assert out["group_minority_fraction"] == pytest.approx([0.5, 0.0])
    assert out["base_minority_fraction"] == pytest.approx(0.25)
    assert out["score_auroc_minority"] == pytest.approx(1.0)
    assert out["hard_assignment_vs_true_groups"] == [[2, 2, 0, 0], [0, 0, 2, 2]]
    assert out["minority_recall"] == 0.0  # both minority samples sit in the low group (column 0)
    # per-prompt blocks of K = 2 columns: the high group is each block's last column
    blocks = torch.zeros(8, 4)
    blocks[[0, 2, 3], 1] = 1.0  # prompt 0: samples 0 (minority), 2, 3 high
    blocks[[1], 2] = 1.0  # prompt 1: minority sample 1 low
    blocks[[4, 5, 6, 7], 3] = 1.0
    assert group_alignment(blocks, scores, minority, true_groups, groups=2)["minority_recall"] == 0.5


def test_group_alignment_soft_weights_and_degenerate_auroc():
    weights = torch.tensor([[0.75, 0.25], [0.5, 0.5], [0.0, 1.0], [0.25, 0.75]])
    minority = torch.tensor([True, False, False, False])
    scores = torch.tensor([0.0, 1.0, 2.0, 3.0])  # the minority sample scores lowest
    out = group_alignment(weights, scores, minority, torch.tensor([0, 1, 1, 1]))
    assert out["group_sizes"] == pytest.approx([1.5, 2.5])
    assert out["group_minority_fraction"] == pytest.approx([0.75 / 1.5, 0.25 / 2.5])
    assert out["score_auroc_minority"] == pytest.approx(0.0)
    none = group_alignment(weights, scores, torch.zeros(4, dtype=torch.bool), torch.tensor([0, 1, 1, 1]))
    assert math.isnan(none["score_auroc_minority"])


# ----------------------------------------------------------------------------- quality


@pytest.fixture(scope="module")
def fresh_classifier():
    torch.manual_seed(0)
    return DigitClassifier(resolution=16).eval()


@pytest.fixture(scope="module")
def eval_images():
    return colored_digits("eval", resolution=16).images[:64]


def test_frechet_distance_self_is_zero_and_grows_with_shift(fresh_classifier, eval_images):
    x = eval_images
    self_fd = frechet_distance(fresh_classifier, x, x)
    assert abs(self_fd) < 1e-6
    dims = [frechet_distance(fresh_classifier, x, x * s) for s in (0.8, 0.5, 0.0)]
    assert dims[0] > 1e-5
    assert dims[0] < dims[1] < dims[2], dims


@pytest.mark.parametrize("num_samples, num_reference", [(1, 64), (5, 1)])
def test_evaluate_samples_skips_the_frechet_distance_below_two_images(fresh_classifier, eval_images, num_samples, num_reference):
    # A covariance needs 2 samples per set: the rest is still reported, with one line saying why.
    ds = colored_digits("train", p=0.9, resolution=16)
    out = evaluate_samples(ds.images[:num_samples], ds.prompt_ids[:num_samples], 10, 2, fresh_classifier,
                           eval_images[:num_reference])
    assert "frechet_distance" not in out
    line, = out["skipped"]
    assert line.startswith("Frechet distance skipped") and "at least 2" in line and "\n" not in line
    assert 0.0 <= out["bias"] <= 1.0 and 0.0 <= out["digit_accuracy"] <= 1.0


def test_digit_classifier_is_colour_invariant(fresh_classifier):
    intensity, _ = _digit_intensity(16)
    red = render(intensity[:8], torch.zeros(8, dtype=torch.long))
    blue = render(intensity[:8], torch.full((8,), 2, dtype=torch.long))
    with torch.no_grad():
        assert torch.equal(fresh_classifier(red), fresh_classifier(blue))
    assert frechet_distance(fresh_classifier, red, blue) == pytest.approx(0.0, abs=1e-6)


def test_evaluate_samples_counts_predicted_colours(fresh_classifier):
    ds = colored_digits("train", p=0.9, resolution=16)
    idx = torch.arange(0, len(ds), 9)
    images, prompts, colors = ds.images[idx], ds.prompt_ids[idx], ds.attributes["color"][idx]
    out = evaluate_samples(images, prompts, 10, 2, fresh_classifier, majority=torch.arange(10) % 2)
    true_counts = attribute_counts(prompts, colors, 10, 2)
    assert out["counts"] == true_counts.tolist()
    assert out["bias"] == pytest.approx(bias_summary(true_counts)["bias"])
    assert 0.0 <= out["digit_accuracy"] <= 1.0
    share = (true_counts[torch.arange(10), torch.arange(10) % 2].double() / true_counts.sum(1)).tolist()
    assert out["majority_share"] == pytest.approx(share)


def test_shipped_classifier_scores_real_eval_images():
    """The shipped digit classifier on real eval images of every benchmark: accuracy >= 0.9 through
    evaluate_samples, and the metric falls apart if the predicted digits are inverted."""
    from invdiff.data.stroke_digits import stroke_digits
    from invdiff.metrics import load_digit_classifier

    classifier = load_digit_classifier()
    for ds in (colored_digits("eval", resolution=16), colored_digits("eval", num_colors=3, resolution=16),
               stroke_digits("eval")):
        out = evaluate_samples(ds.images, ds.prompt_ids, 10, 2, classifier)
        assert out["digit_accuracy"] >= 0.9, (ds.name, out["digit_accuracy"])
        inverted = evaluate_samples(ds.images, 9 - ds.prompt_ids, 10, 2, classifier)
        assert inverted["digit_accuracy"] < 0.2, inverted["digit_accuracy"]


def test_evaluate_samples_takes_measured_attributes(fresh_classifier):
    ds = colored_digits("train", p=0.9, resolution=16)
    idx = torch.arange(0, len(ds), 7)
    given = torch.randint(0, 2, (idx.numel(),), generator=torch.Generator().manual_seed(0))
    out = evaluate_samples(ds.images[idx], ds.prompt_ids[idx], 10, 2, fresh_classifier, attributes=given)
    assert out["counts"] == attribute_counts(ds.prompt_ids[idx], given, 10, 2).tolist()


def test_digit_classifier_with_pickled_weights_is_refused_before_torch_load(tmp_path, monkeypatch):
    import shutil

    from invdiff.metrics import CLASSIFIER_DIR, load_digit_classifier
    from tests.utils import assert_pickled_weights_refused

    folder = str(tmp_path / "classifier")
    shutil.copytree(CLASSIFIER_DIR, folder)
    assert_pickled_weights_refused(lambda: load_digit_classifier(folder), folder, "diffusion_pytorch_model.bin", monkeypatch)
