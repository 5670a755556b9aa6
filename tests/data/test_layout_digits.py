"""The held-out settings of issue 21: digit position and digit size, not a stroke property."""
import pytest
import torch

from invdiff.data import DataError, load_dataset
from invdiff.data.layout_digits import LAYOUT_ATTRIBUTES, LayoutProbe, layout_digits
from invdiff.data.stroke_digits import write_imagefolder


@pytest.mark.parametrize("attribute", sorted(LAYOUT_ATTRIBUTES))
def test_bias_and_balance_by_construction(attribute):
    train, evaluation = layout_digits("train", attribute, p=0.9), layout_digits("eval", attribute)
    value, digit = train.attributes[attribute], train.attributes["digit"]
    for d in range(10):
        share = float((value[digit == d] == d % 2).float().mean())
        assert abs(share - 0.9) < 0.02, (d, share)
    assert abs(float(evaluation.attributes[attribute].float().mean()) - 0.5) < 0.05
    # white digits: every channel equal, so no channel map can express the attribute
    assert torch.equal(train.images[:, 0], train.images[:, 1]) and torch.equal(train.images[:, 1], train.images[:, 2])
    assert train.images.min() >= -1 and train.images.max() <= 1
    assert train.images.shape[1:] == (3, 16, 16)


def test_position_puts_the_ink_on_its_side_and_size_spreads_it():
    pos = layout_digits("eval", "position")
    ink = (pos.images[:, 0] + 1) / 2
    left_half, right_half = ink[:, :, :8].sum((1, 2)), ink[:, :, 8:].sum((1, 2))
    right = pos.attributes["position"] == 1
    assert bool((right_half[right] > left_half[right]).all()) and bool((left_half[~right] > right_half[~right]).all())
    size = layout_digits("eval", "size")
    ink = (size.images[:, 0] + 1) / 2
    border = ink.sum((1, 2)) - ink[:, 4:12, 4:12].sum((1, 2))  # ink outside the central half
    small = size.attributes["size"] == 0
    assert float(border[small].abs().max()) == 0.0 and float(border[~small].min()) > 0.0


@pytest.mark.parametrize("attribute", sorted(LAYOUT_ATTRIBUTES))
def test_the_probe_reads_the_attribute_from_pixels(attribute):
    probe = LayoutProbe(layout_digits("eval", attribute), attribute)
    train = layout_digits("train", attribute, p=0.9)
    guess = probe(train.images, train.prompt_ids)
    assert float((guess == train.attributes[attribute]).float().mean()) > 0.97
    assert float((1 - guess == train.attributes[attribute]).float().mean()) < 0.05  # an inverted probe fails


def test_imagefolder_round_trip(tmp_path):
    ds = layout_digits("train", "size", p=0.9)
    loaded = load_dataset(write_imagefolder(ds, str(tmp_path / "size")))
    assert len(loaded) == len(ds) and loaded.prompts == ds.prompts
    assert float((loaded.images - ds.images).abs().max()) <= 1 / 127.5 + 1e-6  # PNG quantisation only
    assert torch.equal(loaded.attributes["size"], ds.attributes["size"])


def test_bad_arguments():
    with pytest.raises(DataError, match="attribute"):
        layout_digits("train", "slant")
    with pytest.raises(DataError, match="split"):
        layout_digits("test")
    with pytest.raises(DataError, match="bias p"):
        layout_digits("train", p=0.3)
    with pytest.raises(DataError, match="at least 16"):
        layout_digits("train", resolution=8)
    with pytest.raises(DataError, match="attribute"):
        LayoutProbe(layout_digits("eval"), "slant")
