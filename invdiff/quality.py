"""Image-quality metrics that only ever read local weights: FID, CLIP-T, improved precision/recall.

Nothing here downloads. FID and CLIP-T need pretrained networks, so they run only when the caller
points at files on disk (`--inception-weights FILE`, `--clip-model DIR`); without them each metric is
skipped and says why in one line; a path given but not there is a CheckpointError
(`check_weight_paths`, before anything is computed). Improved precision/recall works on any feature
space, e.g. a classifier's penultimate features, so it needs no pretrained weights at all. A metric
that the number of images does not allow (too few for its k-NN balls or its covariance) is skipped
with its line too, and the others are reported.

Images everywhere are (N, 3, H, W) float tensors in [-1, 1], the range the samplers produce.
"""
from __future__ import annotations

import importlib.util
import os
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from .io import CheckpointError

INCEPTION_FLAG = "--inception-weights"
CLIP_FLAG = "--clip-model"

# Rows of the pairwise-distance matrix computed at once: bounds memory at
# DISTANCE_CHUNK * N float64 values (about 80 MB for N = 10k) instead of N * N.
DISTANCE_CHUNK = 1024
# Images per forward pass of the Inception / CLIP networks.
IMAGE_BATCH = 64
# A covariance needs 2 samples (it divides by N - 1).
FID_MIN_IMAGES = 2


def _check_images(images: torch.Tensor, name: str) -> None:
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"{name} must be (N, 3, H, W) images in [-1, 1], got shape {tuple(images.shape)}")


def images_to_uint8(images: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) float in [-1, 1] -> (N, 3, H, W) uint8 in [0, 255], rounded (not truncated)."""
    return ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def too_few_images(metric: str, need: int, num_real: int, num_fake: int, why: str) -> Optional[str]:
    """The one-line reason to skip `metric` when a set has fewer than `need` images, else None.
    why: what needs them, e.g. "a covariance"."""
    if min(num_real, num_fake) >= need:
        return None
    return f"{metric} skipped: it needs at least {need} images per set ({why}), got {num_real} real and {num_fake} fake"


def _check_inception_weights(weights_path: str) -> None:
    if not os.path.isfile(weights_path):
        raise CheckpointError(f"{INCEPTION_FLAG}: Inception weights file not found: {weights_path}")


def _check_clip_folder(model_path: str) -> None:
    if not os.path.isdir(model_path):
        raise CheckpointError(f"{CLIP_FLAG}: CLIP model folder not found: {model_path}")
    if not os.path.isfile(os.path.join(model_path, "config.json")):
        raise CheckpointError(
            f"{CLIP_FLAG}: {model_path} has no config.json; expected a folder written by "
            "CLIPModel.save_pretrained and CLIPProcessor.save_pretrained"
        )


def check_weight_paths(inception_weights: Optional[str], clip_model: Optional[str]) -> None:
    """A CheckpointError naming the path when a given Inception weights file or CLIP model folder
    is not there; None (the metric is skipped) passes. It only looks at the file system, so call
    it before any image is loaded or metric computed: a typo must not cost a whole evaluation."""
    if inception_weights is not None:
        _check_inception_weights(inception_weights)
    if clip_model is not None:
        _check_clip_folder(clip_model)


# ----------------------------------------------------------------------------- FID (Inception)


def _torch_fidelity_installed() -> bool:
    # torchmetrics builds its Inception network from torch-fidelity's FeatureExtractorInceptionV3.
    return importlib.util.find_spec("torch_fidelity") is not None


def inception_network(weights_path: str) -> torch.nn.Module:
    """torch-fidelity's Inception v3 (2048-d pool features) from a local weights file, built the way
    torchmetrics builds it for FrechetInceptionDistance(feature=2048). Needs torch-fidelity.
    forward: (B, 3, H, W) uint8 in [0, 255], any size (resized to 299x299) -> (B, 2048)."""
    from torchmetrics.image import fid as torchmetrics_fid

    try:
        network = torchmetrics_fid.NoTrainInceptionV3(
            name="inception-v3-compat", features_list=["2048"], feature_extractor_weights_path=weights_path
        )
    except ImportError:
        raise  # no torch-fidelity: not the weights' fault
    except Exception as exc:  # a file that is not torch-fidelity's state dict
        raise CheckpointError(f"{INCEPTION_FLAG}: could not load the Inception weights {weights_path}: {exc}") from exc
    return network


@torch.no_grad()
def fid_with_network(real: torch.Tensor, fake: torch.Tensor, feature_network: torch.nn.Module) -> float:
    """FID between two image sets in the feature space of `feature_network`, by torchmetrics'
    FrechetInceptionDistance (features accumulated in float64, IMAGE_BATCH images per pass).

    real: (N_real, 3, H, W), fake: (N_fake, 3, H', W'), floats in [-1, 1], at least 2 images each.
    feature_network: (B, 3, H, W) uint8 in [0, 255] -> (B, D) features, the contract of
    torch-fidelity's Inception (`inception_network`); any module honouring it can stand in, e.g. a
    small random one in tests. A `num_features` attribute saves torchmetrics a dummy forward pass.
    """
    from torchmetrics.image.fid import FrechetInceptionDistance

    _check_images(real, "real")
    _check_images(fake, "fake")
    if min(real.shape[0], fake.shape[0]) < FID_MIN_IMAGES:
        raise ValueError(f"FID needs at least {FID_MIN_IMAGES} real and {FID_MIN_IMAGES} fake images (a covariance), "
                         f"got {real.shape[0]} and {fake.shape[0]}")
    # normalize=False: we hand over uint8 ourselves, rounded, whereas torchmetrics' normalize=True
    # truncates (x * 255).byte() and also expects [0, 1] rather than our [-1, 1].
    metric = FrechetInceptionDistance(feature=feature_network, normalize=False).to(real.device)
    for is_real, images in ((True, real), (False, fake)):
        for start in range(0, images.shape[0], IMAGE_BATCH):
            metric.update(images_to_uint8(images[start : start + IMAGE_BATCH]).to(metric.device), real=is_real)
    return float(metric.compute())


def inception_fid(
    real: torch.Tensor, fake: torch.Tensor, weights_path: Optional[str]
) -> Tuple[Optional[float], str]:
    """FID between two image sets with the 2048-d Inception pool features, from local weights only.

    real: (N_real, 3, H, W), fake: (N_fake, 3, H', W'), floats in [-1, 1]; any size (the network
    resizes to 299x299 itself).
    weights_path: torch-fidelity's Inception state dict (weights-inception-2015-12-05-6726825d.pth)
    saved on disk. None skips the metric.

    Returns (fid, line): fid is None when skipped (no weights, fewer than 2 images in a set, no
    torch-fidelity), and `line` then says why in one line; otherwise `line` describes what was
    computed. Raises CheckpointError when `weights_path` does not exist or does not load.
    """
    if weights_path is None:
        return None, (
            f"FID (Inception) skipped: no local Inception weights given ({INCEPTION_FLAG} FILE); "
            "nothing is downloaded"
        )
    _check_inception_weights(weights_path)
    _check_images(real, "real")
    _check_images(fake, "fake")
    too_few = too_few_images("FID (Inception)", FID_MIN_IMAGES, real.shape[0], fake.shape[0], "a covariance")
    if too_few is not None:
        return None, too_few
    if not _torch_fidelity_installed():
        return None, (
            "FID (Inception) skipped: torch-fidelity is not installed "
            "(pip install torch-fidelity; torchmetrics builds its Inception network from it)"
        )
    fid = fid_with_network(real, fake, inception_network(weights_path))
    return fid, f"FID (Inception, 2048-d, {real.shape[0]} real vs {fake.shape[0]} fake images) from {weights_path}"


# ----------------------------------------------------------------------------- CLIP-T


def _load_local_clip(model_path: str):
    """A CLIPModel + CLIPProcessor from a save_pretrained folder, never touching the network."""
    _check_clip_folder(model_path)
    from transformers import CLIPModel, CLIPProcessor

    from .io import require_safetensors

    require_safetensors(model_path, f"{CLIP_FLAG} {model_path}: the CLIP model's")  # never unpickle a user's folder
    from transformers.utils import logging as hf_logging

    # transformers draws a "Loading weights" progress bar; a report should not write to the terminal.
    bars_were_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model = CLIPModel.from_pretrained(model_path, local_files_only=True, use_safetensors=True)
        processor = CLIPProcessor.from_pretrained(model_path, local_files_only=True)
    except Exception as exc:  # a damaged or foreign folder: transformers raises many kinds
        raise CheckpointError(f"{CLIP_FLAG}: could not load a CLIP model from {model_path}: {exc}") from exc
    finally:
        if bars_were_enabled:
            hf_logging.enable_progress_bar()
    return model.eval(), processor


def _projected_embedding(output) -> torch.Tensor:
    # transformers 4.x returns the projected embedding as a tensor; 5.x returns a ModelOutput whose
    # pooler_output holds it. (The latter is why torchmetrics 1.9's CLIPScore breaks: it calls
    # .norm() on that ModelOutput.)
    return output if isinstance(output, torch.Tensor) else output.pooler_output


@torch.no_grad()
def clip_score(
    images: torch.Tensor, prompts: Sequence[str], model_path: Optional[str]
) -> Tuple[Optional[float], str]:
    """CLIP-T: mean over pairs of 100 * max(cos(image embedding, prompt embedding), 0).

    images: (N, 3, H, W) float in [-1, 1]; prompts: N strings, prompts[i] describes images[i].
    model_path: a local folder holding a CLIPModel and CLIPProcessor written with save_pretrained.
    None skips the metric.

    Returns (score, line): score in [0, 100], None when skipped (`line` says why in one line).
    Raises CheckpointError when `model_path` is not a saved model folder or does not load.

    Why not torchmetrics' CLIPScore: (1) given a string it only accepts hub names containing
    "openai", "jinaai" or "zer0int" and raises ValueError for any other local folder, and
    (2) with transformers 5 its feature step fails (get_image_features now returns a ModelOutput).
    The formula is the same, except torchmetrics clamps the *mean* at 0 where CLIP-T clamps each
    pair; the two agree whenever every cosine is positive, as it is for trained CLIP models.
    """
    if model_path is None:
        return None, f"CLIP-T skipped: no local CLIP model folder given ({CLIP_FLAG} DIR); nothing is downloaded"
    model, processor = _load_local_clip(model_path)
    _check_images(images, "images")
    prompts = list(prompts)
    if len(prompts) != images.shape[0]:
        raise ValueError(f"need one prompt per image, got {len(prompts)} prompts for {images.shape[0]} images")
    if images.shape[0] == 0:
        raise ValueError("CLIP-T needs at least one image")

    device = images.device
    model = model.to(device)
    # CLIP's text tower has a fixed context (77 tokens for OpenAI models): longer prompts are cut,
    # keeping the end-of-text token that the pooled text embedding is read from.
    max_tokens = model.config.text_config.max_position_embeddings
    per_pair: List[torch.Tensor] = []
    for start in range(0, images.shape[0], IMAGE_BATCH):
        batch = images_to_uint8(images[start : start + IMAGE_BATCH]).cpu()
        pixels = processor.image_processor(
            images=list(batch), return_tensors="pt", input_data_format="channels_first"
        )["pixel_values"]
        tokens = processor.tokenizer(
            prompts[start : start + IMAGE_BATCH],
            padding=True,
            truncation=True,
            max_length=max_tokens,
            return_tensors="pt",
        )
        image_emb = _projected_embedding(model.get_image_features(pixel_values=pixels.to(device)))
        text_emb = _projected_embedding(
            model.get_text_features(
                input_ids=tokens["input_ids"].to(device), attention_mask=tokens["attention_mask"].to(device)
            )
        )
        cos = torch.nn.functional.cosine_similarity(image_emb.double(), text_emb.double(), dim=-1)
        per_pair.append(100 * cos.clamp(min=0))
    score = float(torch.cat(per_pair).mean())
    return score, f"CLIP-T ({images.shape[0]} image-prompt pairs) from {model_path}"


# ----------------------------------------------------------------------------- precision / recall


def _knn_radii(features: torch.Tensor, k: int) -> torch.Tensor:
    """(N, D) -> (N,) distance from each point to its k-th nearest neighbour in the same set."""
    radii = []
    for start in range(0, features.shape[0], DISTANCE_CHUNK):
        dist = torch.cdist(features[start : start + DISTANCE_CHUNK], features)
        # Each row contains the point itself at distance 0, so its k-th neighbour is the (k+1)-th
        # smallest entry. Duplicated points are handled too: the copy counts as a neighbour.
        radii.append(dist.kthvalue(k + 1, dim=1).values)
    return torch.cat(radii)


def _fraction_inside(queries: torch.Tensor, manifold: torch.Tensor, radii: torch.Tensor) -> float:
    """Fraction of (M, D) queries inside the union of balls (manifold[j], radii[j])."""
    inside = []
    for start in range(0, queries.shape[0], DISTANCE_CHUNK):
        dist = torch.cdist(queries[start : start + DISTANCE_CHUNK], manifold)
        inside.append((dist <= radii.unsqueeze(0)).any(dim=1))
    return float(torch.cat(inside).double().mean())


def precision_recall(real_features: torch.Tensor, fake_features: torch.Tensor, k: int = 3) -> Dict[str, float]:
    """Improved precision and recall (Kynkaanniemi et al., 2019) in a feature space.

    real_features: (N_real, D), fake_features: (N_fake, D); both sides need at least k + 1 samples.
    Each set's manifold is the union of balls around its samples, each ball's radius being the
    distance to that sample's k-th nearest neighbour within the same set.

    Returns {"precision": fraction of fake samples inside the real manifold (are samples realistic?),
             "recall": fraction of real samples inside the fake manifold (is the data covered?)},
    each in [0, 1].
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    for name, feats in (("real_features", real_features), ("fake_features", fake_features)):
        if feats.ndim != 2:
            raise ValueError(f"{name} must be (N, D), got shape {tuple(feats.shape)}")
        if feats.shape[0] < k + 1:
            raise ValueError(f"{name} has {feats.shape[0]} samples; k={k} nearest neighbours need at least {k + 1}")
        if not torch.isfinite(feats).all():
            raise ValueError(f"{name} contains NaN or inf")
    if real_features.shape[1] != fake_features.shape[1]:
        raise ValueError(
            f"feature sizes differ: real D={real_features.shape[1]}, fake D={fake_features.shape[1]}"
        )
    # float64: cdist's matrix-multiply path loses precision to cancellation in float32, which can
    # move a point just outside a ball whose edge it lies on (e.g. identical feature sets).
    real = real_features.detach().double()
    fake = fake_features.detach().to(device=real.device, dtype=torch.float64)
    precision = _fraction_inside(fake, real, _knn_radii(real, k))
    recall = _fraction_inside(real, fake, _knn_radii(fake, k))
    return {"precision": precision, "recall": recall}


# ----------------------------------------------------------------------------- report


@torch.no_grad()
def _features_in_batches(features_fn: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor) -> torch.Tensor:
    chunks = [features_fn(images[start : start + IMAGE_BATCH]) for start in range(0, images.shape[0], IMAGE_BATCH)]
    # flatten(1): feature extractors often return (N, C, 1, 1) after global pooling.
    return torch.cat(chunks).flatten(1)


def quality_report(
    real: torch.Tensor,
    fake: torch.Tensor,
    prompts: Optional[Sequence[str]] = None,
    *,
    features_fn: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
    inception_weights: Optional[str] = None,
    clip_model: Optional[str] = None,
    k: int = 3,
) -> Dict:
    """Every quality metric that can run with what is given; prints nothing.

    real: (N_real, 3, H, W), fake: (N_fake, 3, H, W), floats in [-1, 1].
    prompts: N_fake strings, prompts[i] produced fake[i] (needed for CLIP-T only).
    features_fn: (B, 3, H, W) images -> (B, D) features (or (B, ...), flattened), e.g. a
        classifier's penultimate layer; enables precision/recall with `k` nearest neighbours.
    inception_weights / clip_model: local weights for FID / CLIP-T (see inception_fid, clip_score);
        a path that is not there is a CheckpointError before anything is computed.

    Returns a dict with "num_real", "num_fake", the computed metrics among "precision", "recall",
    "fid", "clip_t", and "skipped": one line per metric that did not run, saying why (no weights,
    or too few images: precision/recall needs k + 1 per set, FID 2).
    """
    check_weight_paths(inception_weights, clip_model)
    _check_images(real, "real")
    _check_images(fake, "fake")
    report: Dict = {"num_real": int(real.shape[0]), "num_fake": int(fake.shape[0])}
    skipped: List[str] = []

    # The threshold of precision_recall: each point's ball reaches its k-th neighbour in its own set.
    too_few = too_few_images(
        "precision/recall", k + 1, real.shape[0], fake.shape[0], f"k={k} nearest neighbours besides the point itself"
    )
    if features_fn is None:
        skipped.append("precision/recall skipped: no features_fn given (e.g. a classifier's penultimate features)")
    elif too_few is not None:
        skipped.append(too_few)
    else:
        report.update(
            precision_recall(_features_in_batches(features_fn, real), _features_in_batches(features_fn, fake), k=k)
        )

    fid, fid_line = inception_fid(real, fake, inception_weights)
    if fid is None:
        skipped.append(fid_line)
    else:
        report["fid"] = fid

    if clip_model is not None and prompts is None:
        skipped.append("CLIP-T skipped: a CLIP model was given but no prompts to score the images against")
    else:
        clip_t, clip_line = clip_score(fake, prompts or [], clip_model)
        if clip_t is None:
            skipped.append(clip_line)
        else:
            report["clip_t"] = clip_t

    report["skipped"] = skipped
    return report
