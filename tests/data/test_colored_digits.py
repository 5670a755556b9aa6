"""The embedded colored-digits benchmark and the DiffusionDataset container."""
from __future__ import annotations

import pytest
import torch

from invdiff.data import DataError, DiffusionDataset, colored_digits, load_dataset
from invdiff.data.colored_digits import PALETTE, digit_prompts, majority_color


@pytest.fixture(scope="module")
def train09():
    return colored_digits("train", p=0.9, num_colors=2, resolution=16, seed=0)


def _per_digit(ds):
    digit, color = ds.attributes["digit"], ds.attributes["color"]
    for d in range(10):
        yield d, color[digit == d]


def test_same_seed_gives_identical_tensors(train09):
    again = colored_digits("train", p=0.9, num_colors=2, resolution=16, seed=0)
    assert torch.equal(again.images, train09.images)
    assert torch.equal(again.prompt_ids, train09.prompt_ids)
    assert torch.equal(again.sample_ids, train09.sample_ids)
    for k in ("color", "digit"):
        assert torch.equal(again.attributes[k], train09.attributes[k])


def test_different_seed_gives_different_colouring(train09):
    other = colored_digits("train", p=0.9, num_colors=2, resolution=16, seed=1)
    common, i0, i1 = _intersect(train09.sample_ids, other.sample_ids)
    assert common.numel() > 500
    # the same source images, coloured differently
    assert not torch.equal(train09.attributes["color"][i0], other.attributes["color"][i1])
    # ... but the bias level is the same
    for (d, c0), (_, c1) in zip(_per_digit(train09), _per_digit(other)):
        assert (c0 == d % 2).sum() == (c1 == d % 2).sum()


def _intersect(a, b):
    pos_b = {int(s): i for i, s in enumerate(b.tolist())}
    i0 = [i for i, s in enumerate(a.tolist()) if int(s) in pos_b]
    i1 = [pos_b[int(a[i])] for i in i0]
    return a[i0], torch.tensor(i0), torch.tensor(i1)


@pytest.mark.parametrize("num_colors", [2, 3])
@pytest.mark.parametrize("p", [0.6, 0.8, 0.9, 1.0])
def test_majority_ratio_per_digit_is_exact(p, num_colors):
    ds = colored_digits("train", p=p, num_colors=num_colors, resolution=8)
    for d, colors in _per_digit(ds):
        n_d = colors.numel()
        majority = majority_color(d, num_colors)
        assert majority == d % num_colors
        n_major = int((colors == majority).sum())
        assert n_major / n_d == round(p * n_d) / n_d, (d, n_major, n_d)
        # the minority images are spread evenly over the other colours
        others = [int((colors == c).sum()) for c in range(num_colors) if c != majority]
        assert sum(others) == n_d - n_major
        assert max(others) - min(others) <= 1
        assert set(colors.tolist()) <= set(range(num_colors))
    if p == 1.0:
        assert torch.equal(ds.attributes["color"], ds.attributes["digit"] % num_colors)


@pytest.mark.parametrize("num_colors", [2, 3])
def test_eval_split_is_balanced(num_colors):
    ds = colored_digits("eval", p=0.9, num_colors=num_colors, resolution=8)
    for d, colors in _per_digit(ds):
        counts = [int((colors == c).sum()) for c in range(num_colors)]
        assert max(counts) - min(counts) <= 1, (d, counts)
    assert ds.info["split"] == "eval"


def test_train_and_eval_are_disjoint_and_cover_all_digits(train09):
    ev = colored_digits("eval", p=0.9, resolution=16)
    assert set(train09.sample_ids.tolist()).isdisjoint(ev.sample_ids.tolist())
    assert len(train09) + len(ev) == 1797  # every sklearn digit image is in exactly one split
    for ds in (train09, ev):
        assert set(ds.prompt_ids.tolist()) == set(range(10))
        assert torch.equal(ds.prompt_ids, ds.attributes["digit"])
        assert ds.prompts == digit_prompts() == [f"digit {d}" for d in range(10)]
        assert ds.sample_ids.unique().numel() == len(ds)
    # roughly a 80/20 split, stratified per digit
    assert 0.18 < len(ev) / 1797 < 0.22


@pytest.mark.parametrize("resolution", [8, 16])
def test_resolution_and_value_range(resolution):
    ds = colored_digits("eval", p=0.9, resolution=resolution)
    assert ds.images.shape == (len(ds), 3, resolution, resolution)
    assert ds.resolution == resolution and ds.channels == 3
    assert ds.images.dtype == torch.float32
    assert float(ds.images.min()) >= -1.0 and float(ds.images.max()) <= 1.0
    assert float(ds.images.min()) == -1.0  # black background
    assert float(ds.images.max()) > 0.5  # bright strokes


def test_images_carry_their_colour(train09):
    # a channel that is off in the palette colour stays at -1 (black) across the whole image
    for i in range(0, len(train09), 97):
        rgb = PALETTE[int(train09.attributes["color"][i])]
        img = train09.images[i]
        for ch in range(3):
            if rgb[ch] == 0:
                assert float(img[ch].max()) == -1.0
            else:
                assert float(img[ch].max()) > 0.0


@pytest.mark.parametrize(
    "p, num_colors, bound",
    [(0.3, 2, "0.500"), (0.49, 2, "0.500"), (1.01, 2, "0.500"), (0.3, 3, "0.333"), (1.5, 3, "0.333"), (-0.1, 2, "0.500")],
)
def test_bias_outside_bounds_is_rejected(p, num_colors, bound):
    with pytest.raises(DataError) as info:
        colored_digits("train", p=p, num_colors=num_colors)
    msg = str(info.value)
    assert "[1/A, 1]" in msg and bound in msg and str(p) in msg


@pytest.mark.parametrize("p, num_colors", [(0.5, 2), (1 / 3, 3), (1.0, 3)])
def test_bias_at_the_bounds_is_accepted(p, num_colors):
    ds = colored_digits("train", p=p, num_colors=num_colors, resolution=8)
    assert ds.info["p"] == p


def test_other_bad_arguments():
    with pytest.raises(DataError, match="num_colors"):
        colored_digits("train", num_colors=1)
    with pytest.raises(DataError, match="num_colors"):
        colored_digits("train", num_colors=len(PALETTE) + 1)
    with pytest.raises(DataError, match="split"):
        colored_digits("test")
    with pytest.raises(DataError, match="resolution"):
        colored_digits("train", resolution=4)


def test_training_view_drops_attributes_only(train09):
    view = train09.training_view()
    assert view.attributes is None
    assert train09.attributes is not None  # the original is untouched
    assert view.images is train09.images
    assert torch.equal(view.prompt_ids, train09.prompt_ids)
    assert torch.equal(view.sample_ids, train09.sample_ids)
    assert view.prompts == train09.prompts and view.info == train09.info


def test_subset_keeps_prompts_and_slices_attributes(train09):
    idx = torch.tensor([5, 0, 17])
    sub = train09.subset(idx)
    assert len(sub) == 3
    assert sub.prompts == train09.prompts
    assert torch.equal(sub.images, train09.images[idx])
    assert torch.equal(sub.sample_ids, train09.sample_ids[idx])
    assert torch.equal(sub.attributes["color"], train09.attributes["color"][idx])


def test_dataset_validation():
    img = torch.zeros(3, 3, 8, 8)
    ok = dict(images=img, prompt_ids=torch.tensor([0, 1, 0]), prompts=["a", "b"], sample_ids=torch.tensor([4, 5, 6]), name="t")
    assert len(DiffusionDataset(**ok)) == 3
    with pytest.raises(DataError, match="empty"):
        DiffusionDataset(**{**ok, "images": img[:0], "prompt_ids": torch.tensor([], dtype=torch.long), "sample_ids": torch.tensor([], dtype=torch.long)})
    with pytest.raises(DataError, match="unique"):
        DiffusionDataset(**{**ok, "sample_ids": torch.tensor([4, 4, 6])})
    with pytest.raises(DataError, match="prompt list"):
        DiffusionDataset(**{**ok, "prompt_ids": torch.tensor([0, 2, 0])})
    with pytest.raises(DataError, match="prompt_ids must have shape"):
        DiffusionDataset(**{**ok, "prompt_ids": torch.tensor([0, 1])})
    with pytest.raises(DataError, match=r"\(N, C, H, W\)"):
        DiffusionDataset(**{**ok, "images": torch.zeros(3, 8, 8)})


def test_load_dataset_colored_digits():
    ds = load_dataset("colored-digits", split="train", bias=0.8, num_colors=3, resolution=8, seed=2)
    assert ds.info == {"split": "train", "p": 0.8, "num_colors": 3, "resolution": 8, "seed": 2}
    assert torch.equal(ds.images, colored_digits("train", p=0.8, num_colors=3, resolution=8, seed=2).images)


# ---------------------------------------------------------------------------------------------
# resolution bounds: a side past limits.MAX_IMAGE_SIDE, or data the memory cannot hold, is one
# line before anything is rendered (a side of 60000 pixels used to allocate until MemoryError)
# ---------------------------------------------------------------------------------------------
import importlib  # noqa: E402
import time  # noqa: E402

from invdiff.data.stroke_digits import stroke_digits  # noqa: E402

# By module name: invdiff.data's attribute `colored_digits` is the function of that name.
colored_digits_module = importlib.import_module("invdiff.data.colored_digits")


@pytest.fixture()
def no_rendering(monkeypatch):
    """Resizing the 8x8 digits, the first allocation at the asked size, fails the test."""
    class Forbidden:
        @staticmethod
        def interpolate(*args, **kwargs):
            raise AssertionError("the digits were rendered before the resolution was checked")

    monkeypatch.setattr(colored_digits_module, "F", Forbidden)


@pytest.mark.parametrize("build", [
    lambda r: colored_digits("train", resolution=r),
    lambda r: stroke_digits("train", resolution=r),
    lambda r: load_dataset("colored-digits", resolution=r),
], ids=["colored_digits", "stroke_digits", "load_dataset"])
def test_a_resolution_past_the_cap_is_refused_at_once(no_rendering, build):
    start = time.perf_counter()
    with pytest.raises(ValueError) as info:
        build(60_000)
    assert str(info.value) == "--resolution is 60000 pixels; invdiff's cap is 4096 (invdiff/limits.py)"
    assert time.perf_counter() - start < 1.0


@pytest.mark.parametrize("build", [
    lambda r: colored_digits("eval", resolution=r),
    lambda r: stroke_digits("eval", resolution=r),
], ids=["colored_digits", "stroke_digits"])
def test_data_the_memory_cannot_hold_is_refused_before_rendering(no_rendering, monkeypatch, build):
    import invdiff.limits

    monkeypatch.setattr(invdiff.limits, "available_memory_bytes", lambda: 64 << 20)  # 64 MB free
    with pytest.raises(ValueError) as info:
        build(128)  # 1797 digits x (1 + 3) channels x 128 x 128 x 4 bytes: 471 MB
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith("the digits at --resolution 128 (1797 images of 128x128) would need 449.2 MB")
    assert msg.endswith("; lower --resolution")


@pytest.mark.parametrize("resolution, msg", [
    ("16", "resolution must be an integer >= 8, got '16'"),
    (16.0, "resolution must be an integer >= 8, got 16.0"),
    (True, "resolution must be an integer >= 8, got True"),
    (4, "resolution must be >= 8, got 4"),
])
def test_a_resolution_that_is_no_integer_is_a_data_error(resolution, msg):
    for build in (colored_digits, stroke_digits):
        with pytest.raises(DataError) as info:
            build("train", resolution=resolution)
        assert str(info.value) == msg
