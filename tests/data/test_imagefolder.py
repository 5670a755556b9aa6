"""Loading a folder of images + metadata.jsonl (diffusers' imagefolder layout)."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from invdiff.data import DataError, load_dataset
from invdiff.data.imagefolder import imagefolder


def _png(path, color, size=(4, 4), mode="RGB"):
    Image.new(mode, size, color).save(path)


def _write_metadata(root, rows):
    with open(os.path.join(root, "metadata.jsonl"), "w") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")


@pytest.fixture()
def folder(tmp_path):
    _png(tmp_path / "a.png", (255, 0, 0))
    _png(tmp_path / "b.png", (0, 255, 0))
    _png(tmp_path / "c.png", (0, 0, 255))
    _png(tmp_path / "d.png", 128, mode="L")  # greyscale is converted to RGB
    _write_metadata(
        tmp_path,
        [
            {"file_name": "a.png", "text": "a photo of a nurse", "gender": "female", "age": 30},
            {"file_name": "b.png", "text": "a photo of a doctor", "gender": "male", "age": 40},
            "",  # blank lines are skipped
            {"file_name": "c.png", "text": "a photo of a nurse", "gender": "male", "age": 30},
            {"file_name": "d.png", "text": "a photo of a doctor", "gender": "female"},
        ],
    )
    return tmp_path


def test_loads_images_prompts_and_attributes(folder):
    ds = imagefolder(str(folder))
    assert len(ds) == 4
    assert ds.images.shape == (4, 3, 4, 4) and ds.images.dtype == torch.float32
    # pixel values map 0 -> -1 and 255 -> 1
    assert torch.equal(ds.images[0, :, 0, 0], torch.tensor([1.0, -1.0, -1.0]))
    assert torch.equal(ds.images[1, :, 0, 0], torch.tensor([-1.0, 1.0, -1.0]))
    assert torch.equal(ds.images[2, :, 0, 0], torch.tensor([-1.0, -1.0, 1.0]))
    torch.testing.assert_close(ds.images[3], torch.full((3, 4, 4), 128 / 127.5 - 1.0))
    # prompts are the sorted unique texts; ids point into them
    assert ds.prompts == ["a photo of a doctor", "a photo of a nurse"]
    assert ds.prompt_ids.tolist() == [1, 0, 1, 0]
    assert [ds.prompts[i] for i in ds.prompt_ids] == [
        "a photo of a nurse", "a photo of a doctor", "a photo of a nurse", "a photo of a doctor",
    ]
    assert ds.sample_ids.tolist() == [0, 1, 2, 3]
    # every extra column is an evaluation-only attribute, values indexed in sorted string order
    assert set(ds.attributes) == {"gender", "age"}
    assert ds.attributes["gender"].tolist() == [0, 1, 1, 0]
    assert ds.info["attribute_values"]["gender"] == ["female", "male"]
    assert ds.info["attribute_values"]["age"] == ["30", "40", "None"]  # a missing value is its own class
    assert ds.attributes["age"].tolist() == [0, 1, 0, 2]
    assert ds.training_view().attributes is None
    assert ds.info["root"] == os.path.abspath(folder)


def test_no_extra_columns_means_no_attributes(tmp_path):
    _png(tmp_path / "x.png", (10, 20, 30), size=(6, 6))
    _write_metadata(tmp_path, [{"file_name": "x.png", "text": "only"}])
    ds = imagefolder(str(tmp_path))
    assert ds.attributes is None
    assert ds.prompts == ["only"] and ds.resolution == 6


def test_load_dataset_dispatches_to_imagefolder(folder):
    ds = load_dataset(str(folder))
    assert ds.prompts == ["a photo of a doctor", "a photo of a nurse"]
    assert ds.name.startswith("imagefolder:")


def test_missing_folder(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(DataError, match=r"does not exist") as info:
        imagefolder(str(missing))
    assert str(missing) in str(info.value)


def test_missing_metadata(tmp_path):
    _png(tmp_path / "a.png", (1, 2, 3))
    with pytest.raises(DataError, match=r"has no metadata\.jsonl.*file_name"):
        imagefolder(str(tmp_path))


def test_empty_metadata(tmp_path):
    _write_metadata(tmp_path, ["", "   "])
    with pytest.raises(DataError, match="lists no images"):
        imagefolder(str(tmp_path))


def test_metadata_listing_a_missing_file(folder):
    with open(folder / "metadata.jsonl", "a") as f:
        f.write(json.dumps({"file_name": "ghost.png", "text": "a photo of a nurse"}) + "\n")
    with pytest.raises(DataError, match=r"1 file\(s\) listed in metadata\.jsonl are missing.*ghost\.png"):
        imagefolder(str(folder))


def test_mixed_image_sizes(tmp_path):
    _png(tmp_path / "small.png", (0, 0, 0), size=(4, 4))
    _png(tmp_path / "big.png", (0, 0, 0), size=(8, 8))
    _write_metadata(tmp_path, [{"file_name": "small.png", "text": "t"}, {"file_name": "big.png", "text": "t"}])
    with pytest.raises(DataError, match=r"mixed sizes: 4x4 \(e\.g\. small\.png\), 8x8 \(e\.g\. big\.png\)"):
        imagefolder(str(tmp_path))


def test_non_square_images(tmp_path):
    _png(tmp_path / "wide.png", (0, 0, 0), size=(8, 4))
    _write_metadata(tmp_path, [{"file_name": "wide.png", "text": "t"}])
    with pytest.raises(DataError, match=r"square, got 4x8"):
        imagefolder(str(tmp_path))


def test_invalid_json_line_names_the_line(folder):
    with open(folder / "metadata.jsonl", "a") as f:
        f.write('{"file_name": "a.png", "text": \n')
    with pytest.raises(DataError, match=r"metadata\.jsonl:6: not valid JSON"):
        imagefolder(str(folder))


@pytest.mark.parametrize(
    "line, msg",
    [
        ('{"text": "no file"}', "needs 'file_name' and 'text'"),
        ('{"file_name": "a.png"}', "needs 'file_name' and 'text'"),
        ("5", "needs 'file_name' and 'text'"),
        ('["a.png", "t"]', "needs 'file_name' and 'text'"),
        ('{"file_name": 3, "text": "t"}', "must be strings"),
    ],
)
def test_malformed_rows(tmp_path, line, msg):
    _png(tmp_path / "a.png", (0, 0, 0))
    _write_metadata(tmp_path, [{"file_name": "a.png", "text": "t"}, line])
    with pytest.raises(DataError, match=r"metadata\.jsonl:2: .*" + msg):
        imagefolder(str(tmp_path))


def test_unreadable_image_is_a_data_error(tmp_path):
    (tmp_path / "broken.png").write_bytes(b"this is not a png")
    _write_metadata(tmp_path, [{"file_name": "broken.png", "text": "t"}])
    with pytest.raises(DataError, match=r"'broken\.png'.*not a readable image"):
        imagefolder(str(tmp_path))


def test_roundtrip_of_pixel_values(tmp_path):
    arr = np.arange(4 * 4 * 3, dtype=np.uint8).reshape(4, 4, 3) * 5
    Image.fromarray(arr).save(tmp_path / "grad.png")
    _write_metadata(tmp_path, [{"file_name": "grad.png", "text": "t"}])
    ds = imagefolder(str(tmp_path))
    expected = torch.from_numpy(arr.astype(np.float32)).permute(2, 0, 1) / 127.5 - 1.0
    torch.testing.assert_close(ds.images[0], expected)
