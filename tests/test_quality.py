"""invdiff.quality: improved precision/recall, FID and CLIP-T from local weights only.

CLIP-T runs for real on a tiny random CLIP model that the tests build and save themselves, so
nothing is downloaded. FID runs for real through torchmetrics with a tiny random stand-in for
torch-fidelity's Inception (neither that package nor the weights are on the test machine), and is
checked against a plain Frechet formula; the real network's skip lines and errors are checked too.
"""
from __future__ import annotations


import numpy as np
import pytest
import torch

from invdiff import quality
from invdiff.io import CheckpointError
from invdiff.quality import (
    check_weight_paths,
    clip_score,
    fid_with_network,
    images_to_uint8,
    inception_fid,
    precision_recall,
    quality_report,
)
from tests.utils import write_tiny_clip_tokenizer


# ----------------------------------------------------------------------------- precision / recall


def _gaussian_modes(centres, per_mode: int, seed: int, spread: float = 1.0) -> torch.Tensor:
    """(len(centres) * per_mode, D) points, `per_mode` around each centre (rows grouped by mode)."""
    gen = torch.Generator().manual_seed(seed)
    centres = torch.tensor(centres, dtype=torch.float64)
    noise = torch.randn(len(centres), per_mode, centres.shape[1], generator=gen, dtype=torch.float64)
    return (centres.unsqueeze(1) + spread * noise).reshape(-1, centres.shape[1])


# Four modes 100 apart with unit spread: every k-NN ball stays inside its own mode.
FOUR_MODES = [[0.0, 0.0], [100.0, 0.0], [0.0, 100.0], [100.0, 100.0]]


def test_identical_feature_sets_have_full_precision_and_recall():
    feats = torch.randn(50, 8, generator=torch.Generator().manual_seed(0))
    assert precision_recall(feats, feats.clone()) == {"precision": 1.0, "recall": 1.0}


def test_well_separated_sets_have_zero_precision_and_recall():
    real = _gaussian_modes([[0.0] * 8], per_mode=60, seed=1)
    fake = _gaussian_modes([[100.0] * 8], per_mode=60, seed=2)
    assert precision_recall(real, fake) == {"precision": 0.0, "recall": 0.0}


def test_fake_set_made_of_half_the_real_modes_exactly():
    # fake = the real samples of modes 0 and 1. Each fake point *is* a real point (distance 0), so
    # precision is exactly 1. Real points of modes 0 and 1 are fake points too; those of modes 2
    # and 3 lie ~100 away from any fake point, far outside every fake k-NN ball: recall = 40/80.
    real = _gaussian_modes(FOUR_MODES, per_mode=20, seed=3)
    fake = real[:40]
    assert precision_recall(real, fake) == {"precision": 1.0, "recall": 0.5}


def test_fresh_samples_from_half_the_modes():
    # Same picture with fake drawn independently: a few tail samples may fall outside the balls,
    # so precision is near 1 and recall near (never above) one half.
    real = _gaussian_modes(FOUR_MODES, per_mode=40, seed=4)
    fake = _gaussian_modes(FOUR_MODES[:2], per_mode=40, seed=5)
    scores = precision_recall(real, fake)
    assert scores["precision"] >= 0.9
    assert 0.4 <= scores["recall"] <= 0.5


def test_precision_recall_by_hand_in_one_dimension():
    # k=1. Real {0,1,2,3}: every nearest neighbour is 1 away, so each real ball has radius 1.
    # Fake {0.5, 10}: each one's nearest neighbour is the other, radius 9.5.
    # precision: 0.5 lies in the ball of 0, 10 lies in no real ball -> 1/2.
    # recall: 0, 1, 2, 3 are all within 9.5 of 0.5 -> 4/4.
    real = torch.tensor([[0.0], [1.0], [2.0], [3.0]])
    fake = torch.tensor([[0.5], [10.0]])
    assert precision_recall(real, fake, k=1) == {"precision": 0.5, "recall": 1.0}


def test_precision_recall_is_chunked_consistently(monkeypatch):
    # Chunking the distance matrix (to bound memory) must not change the result.
    real = _gaussian_modes(FOUR_MODES, per_mode=15, seed=6, spread=20.0)
    fake = _gaussian_modes(FOUR_MODES[1:], per_mode=15, seed=7, spread=20.0)
    whole = precision_recall(real, fake)
    monkeypatch.setattr(quality, "DISTANCE_CHUNK", 7)
    assert precision_recall(real, fake) == whole


@pytest.mark.parametrize(
    "real_shape, fake_shape, k, message",
    [
        ((3, 4), (10, 4), 3, "real_features has 3 samples"),  # k + 1 = 4 needed
        ((10, 4), (3, 4), 3, "fake_features has 3 samples"),
        ((10, 4), (10, 5), 3, "feature sizes differ"),
        ((10,), (10, 4), 3, r"must be \(N, D\)"),
        ((10, 4), (10, 2, 2), 3, r"must be \(N, D\)"),
        ((10, 4), (10, 4), 0, "k must be >= 1"),
    ],
)
def test_precision_recall_rejects_bad_inputs(real_shape, fake_shape, k, message):
    with pytest.raises(ValueError, match=message):
        precision_recall(torch.zeros(real_shape), torch.zeros(fake_shape), k=k)


def test_precision_recall_rejects_non_finite_features():
    feats = torch.zeros(10, 4)
    feats[3, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        precision_recall(feats, torch.zeros(10, 4))


# ----------------------------------------------------------------------------- FID


def _images(n: int, seed: int, size: int = 36) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_fid_without_weights_is_skipped_with_one_line():
    fid, line = inception_fid(_images(4, 0), _images(4, 1), None)
    assert fid is None
    assert "skipped" in line and "--inception-weights" in line and "\n" not in line


def test_fid_with_a_missing_weights_file_raises(tmp_path):
    missing = str(tmp_path / "no_such_inception.pth")
    with pytest.raises(CheckpointError, match="--inception-weights") as info:
        inception_fid(_images(4, 0), _images(4, 1), missing)
    assert missing in str(info.value)


def test_fid_without_torch_fidelity_says_so(tmp_path, monkeypatch):
    # Pretend torch-fidelity is absent (as on the test machine) whatever is installed: the weights
    # file exists, so the only reason left to skip is the missing package.
    weights = tmp_path / "inception.pth"
    weights.write_bytes(b"not read")
    monkeypatch.setattr(quality, "_torch_fidelity_installed", lambda: False)
    fid, line = inception_fid(_images(4, 0), _images(4, 1), str(weights))
    assert fid is None
    assert "torch-fidelity is not installed" in line and "\n" not in line


@pytest.mark.parametrize("num_real, num_fake", [(1, 4), (4, 1)])
def test_fid_on_fewer_than_two_images_is_skipped_with_one_line(tmp_path, monkeypatch, num_real, num_fake):
    # A covariance needs 2 samples; the skip comes before the network is built.
    weights = tmp_path / "inception.pth"
    weights.write_bytes(b"not read")
    monkeypatch.setattr(quality, "_torch_fidelity_installed", lambda: True)
    fid, line = inception_fid(_images(num_real, 0), _images(num_fake, 1), str(weights))
    assert fid is None
    assert line.startswith("FID (Inception) skipped") and "at least 2" in line and "\n" not in line


class InceptionStandIn(torch.nn.Module):
    """A tiny random network with the FID contract of torch-fidelity's Inception:
    (B, 3, H, W) uint8 in [0, 255] -> (B, 64) pooled features."""

    num_features = 64

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = torch.nn.Conv2d(3, self.num_features, 3, padding=1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        assert images.dtype == torch.uint8
        x = images.float() / 127.5 - 1
        return torch.tanh(self.conv(x)).mean((2, 3))


def _reference_fid(real_features: np.ndarray, fake_features: np.ndarray) -> float:
    """The Frechet distance of two Gaussians fitted to (N, D) features, in float64 with scipy:
    |mu_r - mu_f|^2 + Tr(S_r + S_f - 2 (S_r S_f)^(1/2))."""
    from scipy.linalg import sqrtm

    mu_r, mu_f = real_features.mean(0), fake_features.mean(0)
    cov_r, cov_f = np.cov(real_features, rowvar=False), np.cov(fake_features, rowvar=False)
    cross = sqrtm(cov_r @ cov_f).real
    return float(((mu_r - mu_f) ** 2).sum() + np.trace(cov_r + cov_f - 2 * cross))


# 150 images per set: more than the 64 feature dimensions, so both covariances have full rank.
FID_SET = 150


def test_fid_with_a_stand_in_network_matches_the_frechet_formula():
    network = InceptionStandIn()
    real, same_distribution = _images(FID_SET, 0, size=8), _images(FID_SET, 1, size=8)
    shifted = (real + 0.5).clamp(-1, 1)
    with torch.no_grad():
        real_features = network(images_to_uint8(real)).double().numpy()
    scores = {}
    for name, fake in (("identical", real.clone()), ("same distribution", same_distribution), ("shifted", shifted)):
        scores[name] = fid_with_network(real, fake, network)
        with torch.no_grad():
            fake_features = network(images_to_uint8(fake)).double().numpy()
        assert scores[name] == pytest.approx(_reference_fid(real_features, fake_features), rel=1e-3, abs=1e-5), name
    assert abs(scores["identical"]) < 1e-5
    assert 0 < scores["same distribution"] < scores["shifted"]


def test_fid_with_network_is_batched_consistently(monkeypatch):
    real, fake = _images(40, 2, size=8), _images(30, 3, size=8)
    whole = fid_with_network(real, fake, InceptionStandIn())
    monkeypatch.setattr(quality, "IMAGE_BATCH", 7)
    assert fid_with_network(real, fake, InceptionStandIn()) == pytest.approx(whole, rel=1e-5)


def test_fid_with_network_needs_two_images_per_set():
    with pytest.raises(ValueError, match="at least 2"):
        fid_with_network(_images(1, 0, size=8), _images(5, 1, size=8), InceptionStandIn())


def test_inception_fid_builds_torch_fidelitys_network_from_the_weights(tmp_path, monkeypatch):
    # The real path, with torch-fidelity's network replaced by the stand-in where torchmetrics
    # would build it: same construction arguments as FrechetInceptionDistance(feature=2048).
    import torchmetrics.image.fid

    weights = tmp_path / "weights-inception-2015-12-05-6726825d.pth"
    weights.write_bytes(b"not read")
    built = {}

    def stand_in(**kwargs):
        built.update(kwargs)
        return InceptionStandIn()

    monkeypatch.setattr(quality, "_torch_fidelity_installed", lambda: True)
    monkeypatch.setattr(torchmetrics.image.fid, "NoTrainInceptionV3", stand_in)
    real, fake = _images(6, 0, size=8), _images(6, 1, size=8)
    fid, line = inception_fid(real, fake, str(weights))
    assert built == {"name": "inception-v3-compat", "features_list": ["2048"],
                     "feature_extractor_weights_path": str(weights)}
    assert fid == fid_with_network(real, fake, InceptionStandIn())
    assert str(weights) in line

    def broken(**kwargs):
        raise RuntimeError("invalid load key, 'n'")

    monkeypatch.setattr(torchmetrics.image.fid, "NoTrainInceptionV3", broken)
    with pytest.raises(CheckpointError, match="could not load") as info:
        inception_fid(real, fake, str(weights))
    assert str(weights) in str(info.value)


def test_images_to_uint8_rounds_the_full_range():
    images = torch.tensor([-1.0, -0.999, 0.0, 0.999, 1.0, 2.0]).view(1, 3, 1, 2)
    assert images_to_uint8(images).flatten().tolist() == [0, 0, 128, 255, 255, 255]


# ----------------------------------------------------------------------------- CLIP-T

# Single characters the tiny tokenizer knows. CLIP's BPE marks the last symbol of each word with
# "</w>", so every character comes in both forms.
TINY_ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789.,!?'-"
PROMPTS = ["a red cat", "a blue 7", "the green digit!", "at"]


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory):
    """A random tiny CLIPModel + CLIPProcessor saved with save_pretrained (a folder path)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    folder = tmp_path_factory.mktemp("tiny_clip")
    # One merge, so the BPE merge table is exercised too: "at" becomes a single token.
    write_tiny_clip_tokenizer(str(folder), model_max_length=32, alphabet=TINY_ALPHABET, merges=["a t</w>"])
    tokenizer = CLIPTokenizer.from_pretrained(str(folder))
    at = tokenizer.convert_tokens_to_ids("at</w>")
    assert tokenizer("at")["input_ids"] == [0, at, 1]  # the files were really read
    vocab = tokenizer.get_vocab()

    processor = CLIPProcessor(image_processor=CLIPImageProcessor(size=32, crop_size=32), tokenizer=tokenizer)
    config = CLIPConfig(
        text_config=dict(
            vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=2, max_position_embeddings=32, bos_token_id=0, eos_token_id=1, pad_token_id=1,
        ),
        vision_config=dict(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
            image_size=32, patch_size=8,
        ),
        projection_dim=16,
    )
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(str(folder))
    processor.save_pretrained(str(folder))
    return str(folder)


def _reference_clip_t(model_dir: str, images: torch.Tensor, prompts) -> float:
    """CLIP-T through the model's own forward: logits_per_image = exp(logit_scale) * cosine."""
    from transformers import CLIPModel, CLIPProcessor

    model = CLIPModel.from_pretrained(model_dir, local_files_only=True).eval()
    processor = CLIPProcessor.from_pretrained(model_dir, local_files_only=True)
    uint8 = ((images + 1) * 127.5).round().to(torch.uint8)
    inputs = processor(text=list(prompts), images=list(uint8), return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model(**inputs)
    cos = out.logits_per_image.diagonal().double() / model.logit_scale.detach().exp().double()
    return float((100 * cos.clamp(min=0)).mean())


def test_clip_score_matches_the_clip_forward_and_is_deterministic(tiny_clip_dir):
    images = _images(len(PROMPTS), seed=8)
    score, line = clip_score(images, PROMPTS, tiny_clip_dir)
    assert isinstance(score, float) and 0.0 <= score <= 100.0
    assert score == pytest.approx(_reference_clip_t(tiny_clip_dir, images, PROMPTS), abs=1e-4)
    assert clip_score(images, PROMPTS, tiny_clip_dir)[0] == score
    assert "CLIP-T" in line


def test_clip_score_agrees_with_torchmetrics_per_pair(tiny_clip_dir):
    # torchmetrics 1.9's CLIPScore cannot run as is on transformers 5 (get_image_features returns a
    # ModelOutput, not a tensor); with that unwrapped it scores each single pair as max(100 cos, 0),
    # which is exactly clip_score on that pair.
    from torchmetrics.multimodal import CLIPScore
    from transformers import CLIPModel, CLIPProcessor

    class TensorFeatures(torch.nn.Module):
        def __init__(self, clip):
            super().__init__()
            self.clip, self.config = clip, clip.config

        def get_image_features(self, *args, **kwargs):
            return quality._projected_embedding(self.clip.get_image_features(*args, **kwargs))

        def get_text_features(self, *args, **kwargs):
            return quality._projected_embedding(self.clip.get_text_features(*args, **kwargs))

    clip = CLIPModel.from_pretrained(tiny_clip_dir, local_files_only=True).eval()
    processor = CLIPProcessor.from_pretrained(tiny_clip_dir, local_files_only=True)
    metric = CLIPScore(model_name_or_path=lambda: (TensorFeatures(clip), processor))
    images = _images(len(PROMPTS), seed=9)
    for image, prompt in zip(images, PROMPTS):
        metric.reset()
        metric.update(images_to_uint8(image.unsqueeze(0)), [prompt])
        ours, _ = clip_score(image.unsqueeze(0), [prompt], tiny_clip_dir)
        assert ours == pytest.approx(float(metric.compute()), abs=1e-3)


def test_clip_score_without_a_model_is_skipped_with_one_line():
    score, line = clip_score(_images(2, 0), ["a", "b"], None)
    assert score is None
    assert "skipped" in line and "--clip-model" in line and "\n" not in line


def test_clip_score_with_a_missing_or_incomplete_folder_raises(tmp_path):
    with pytest.raises(CheckpointError, match="--clip-model"):
        clip_score(_images(2, 0), ["a", "b"], str(tmp_path / "no_such_clip"))
    with pytest.raises(CheckpointError, match="config.json"):
        clip_score(_images(2, 0), ["a", "b"], str(tmp_path))  # exists, but nothing saved in it


def test_clip_score_with_a_corrupt_folder_raises(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    (tmp_path / "model.safetensors").write_bytes(b"not a safetensors file")  # past the safetensors check
    with pytest.raises(CheckpointError, match="could not load") as info:
        clip_score(_images(2, 0), ["a", "b"], str(tmp_path))
    assert str(tmp_path) in str(info.value)


def test_clip_score_needs_one_prompt_per_image(tiny_clip_dir):
    with pytest.raises(ValueError, match="one prompt per image"):
        clip_score(_images(3, 0), ["a", "b"], tiny_clip_dir)


# ----------------------------------------------------------------------------- report


def test_report_without_weights_lists_every_skipped_metric(capsys):
    report = quality_report(_images(6, 0), _images(6, 1), PROMPTS[:2] * 3)
    assert report["num_real"] == report["num_fake"] == 6
    assert not {"precision", "recall", "fid", "clip_t"} & report.keys()
    skipped = report["skipped"]
    assert len(skipped) == 3
    assert any(line.startswith("precision/recall skipped") for line in skipped)
    assert any(line.startswith("FID (Inception) skipped") for line in skipped)
    assert any(line.startswith("CLIP-T skipped") for line in skipped)
    assert all("\n" not in line for line in skipped)
    assert capsys.readouterr().out == ""


def test_report_runs_what_it_can(tiny_clip_dir, capsys):
    real, fake = _images(6, 0), _images(6, 1)
    prompts = PROMPTS[:3] * 2
    report = quality_report(real, real.clone(), prompts, features_fn=lambda x: x.flatten(1), clip_model=tiny_clip_dir)
    assert report["precision"] == report["recall"] == 1.0  # identical image sets
    assert report["clip_t"] == clip_score(real, prompts, tiny_clip_dir)[0]
    assert len(report["skipped"]) == 1 and report["skipped"][0].startswith("FID (Inception) skipped")
    assert capsys.readouterr().out == ""

    # A CLIP model without prompts has nothing to score against: skipped, with its reason.
    report = quality_report(real, fake, None, clip_model=tiny_clip_dir)
    assert any("no prompts" in line for line in report["skipped"])


@pytest.mark.parametrize("which", ["inception_weights", "clip_model"])
def test_report_raises_for_a_missing_weights_path_before_any_compute(tmp_path, which):
    missing = str(tmp_path / "missing")
    features_computed = []

    def features_fn(x):
        features_computed.append(x.shape[0])
        return x.flatten(1)

    with pytest.raises(CheckpointError, match="--inception-weights" if which == "inception_weights" else "--clip-model") as info:
        quality_report(_images(6, 0), _images(6, 1), PROMPTS[:2] * 3, features_fn=features_fn, **{which: missing})
    assert missing in str(info.value)
    assert features_computed == []


def test_check_weight_paths(tmp_path, tiny_clip_dir):
    weights = tmp_path / "inception.pth"
    weights.write_bytes(b"not read")
    check_weight_paths(None, None)
    check_weight_paths(str(weights), tiny_clip_dir)
    for bad, flag in ((dict(inception_weights=str(tmp_path / "nope.pth")), "--inception-weights"),
                      (dict(inception_weights=str(tmp_path)), "--inception-weights"),  # a folder, not the file
                      (dict(clip_model=str(tmp_path / "nope")), "--clip-model"),
                      (dict(clip_model=str(weights)), "--clip-model"),  # a file, not a folder
                      (dict(clip_model=str(tmp_path)), "config.json")):  # a folder with nothing saved in it
        with pytest.raises(CheckpointError, match=flag):
            check_weight_paths(**{"inception_weights": None, "clip_model": None, **bad})


@pytest.mark.parametrize("num_real, num_fake", [(3, 10), (10, 3), (1, 1)])
def test_report_on_too_few_images_skips_precision_recall_and_reports_the_rest(tiny_clip_dir, num_real, num_fake):
    # k = 3 nearest neighbours need k + 1 = 4 samples per set.
    prompts = (PROMPTS * 3)[:num_fake]
    report = quality_report(_images(num_real, 0), _images(num_fake, 1), prompts,
                            features_fn=lambda x: x.flatten(1), clip_model=tiny_clip_dir, k=3)
    assert not {"precision", "recall"} & report.keys()
    line, = [line for line in report["skipped"] if line.startswith("precision/recall skipped")]
    assert "at least 4" in line and f"{num_real} real and {num_fake} fake" in line and "\n" not in line
    assert report["clip_t"] == clip_score(_images(num_fake, 1), prompts, tiny_clip_dir)[0]


def test_clip_folder_with_pickled_weights_is_refused_before_torch_load(tiny_clip_dir, tmp_path, monkeypatch):
    import shutil

    from invdiff.quality import clip_score
    from tests.utils import assert_pickled_weights_refused

    folder = str(tmp_path / "clip")
    shutil.copytree(tiny_clip_dir, folder)
    assert_pickled_weights_refused(lambda: clip_score(_images(len(PROMPTS), seed=1), PROMPTS, folder),
                                   folder, "pytorch_model.bin", monkeypatch)
