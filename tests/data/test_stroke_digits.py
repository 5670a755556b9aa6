"""The held-out non-colour benchmark: stroke thickness, written and read back as an imagefolder."""
import pytest
import torch

from invdiff.data import DataError, load_dataset
from invdiff.data.stroke_digits import ThicknessProbe, ink, stroke_digits, thicken, write_imagefolder


def test_bias_and_balance_by_construction():
    train, evaluation = stroke_digits("train", p=0.9), stroke_digits("eval")
    thick, digit = train.attributes["thickness"], train.attributes["digit"]
    for d in range(10):
        share = float((thick[digit == d] == d % 2).float().mean())
        assert abs(share - 0.9) < 0.02, (d, share)
    assert abs(float(evaluation.attributes["thickness"].float().mean()) - 0.5) < 0.05
    # white strokes: every channel equal, so no channel map can express the attribute
    assert torch.equal(train.images[:, 0], train.images[:, 1]) and torch.equal(train.images[:, 1], train.images[:, 2])
    assert train.images.min() >= -1 and train.images.max() <= 1


def test_thick_strokes_carry_more_ink_and_the_probe_reads_them():
    x = torch.zeros(1, 1, 8, 8)
    x[0, 0, 4, 4] = 1.0
    assert float(thicken(x).sum()) == 9.0
    evaluation = stroke_digits("eval")
    probe = ThicknessProbe(evaluation)
    train = stroke_digits("train", p=0.9)
    accuracy = float((probe(train.images, train.prompt_ids) == train.attributes["thickness"]).float().mean())
    assert accuracy > 0.97, accuracy
    # an inverted probe would be wrong almost everywhere
    assert float((1 - probe(train.images, train.prompt_ids) == train.attributes["thickness"]).float().mean()) < 0.05
    assert float(ink(-torch.ones(2, 3, 4, 4)).abs().max()) == 0.0


def test_imagefolder_round_trip(tmp_path):
    ds = stroke_digits("train", p=0.9)
    loaded = load_dataset(write_imagefolder(ds, str(tmp_path / "thick")))
    assert len(loaded) == len(ds) and loaded.prompts == ds.prompts
    assert float((loaded.images - ds.images).abs().max()) <= 1 / 127.5 + 1e-6  # PNG quantisation only
    assert torch.equal(loaded.attributes["thickness"], ds.attributes["thickness"])
    assert torch.equal(loaded.prompt_ids, ds.prompt_ids)


def test_bad_arguments():
    with pytest.raises(DataError, match="split"):
        stroke_digits("test")
    with pytest.raises(DataError, match="bias p"):
        stroke_digits("train", p=0.3)
