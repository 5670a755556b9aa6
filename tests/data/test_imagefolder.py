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


def _png(path, color, size=(8, 8), mode="RGB"):
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
    assert ds.images.shape == (4, 3, 8, 8) and ds.images.dtype == torch.float32
    # pixel values map 0 -> -1 and 255 -> 1
    assert torch.equal(ds.images[0, :, 0, 0], torch.tensor([1.0, -1.0, -1.0]))
    assert torch.equal(ds.images[1, :, 0, 0], torch.tensor([-1.0, 1.0, -1.0]))
    assert torch.equal(ds.images[2, :, 0, 0], torch.tensor([-1.0, -1.0, 1.0]))
    torch.testing.assert_close(ds.images[3], torch.full((3, 8, 8), 128 / 127.5 - 1.0))
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
    _png(tmp_path / "x.png", (10, 20, 30), size=(10, 10))
    _write_metadata(tmp_path, [{"file_name": "x.png", "text": "only"}])
    ds = imagefolder(str(tmp_path))
    assert ds.attributes is None
    assert ds.prompts == ["only"] and ds.resolution == 10


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
    _png(tmp_path / "small.png", (0, 0, 0), size=(8, 8))
    _png(tmp_path / "big.png", (0, 0, 0), size=(12, 12))
    _write_metadata(tmp_path, [{"file_name": "small.png", "text": "t"}, {"file_name": "big.png", "text": "t"}])
    with pytest.raises(DataError, match=r"mixed sizes: 8x8 \(e\.g\. small\.png\), 12x12 \(e\.g\. big\.png\)"):
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


def test_metadata_that_is_not_utf8_names_the_file_and_line(tmp_path):
    _png(tmp_path / "a.png", (0, 0, 0))
    with open(tmp_path / "metadata.jsonl", "wb") as f:
        f.write(b'{"file_name": "a.png", "text": "t"}\n')
        f.write('{"file_name": "a.png", "text": "caf\u00e9"}\n'.encode("latin-1"))  # saved by a Latin-1 editor
    with pytest.raises(DataError, match=r"metadata\.jsonl:2: not UTF-8 text") as info:
        imagefolder(str(tmp_path))
    assert str(tmp_path) in str(info.value) and "\n" not in str(info.value)


def test_json_nested_too_deeply_names_the_line(tmp_path):
    _png(tmp_path / "a.png", (0, 0, 0))
    _write_metadata(tmp_path, [{"file_name": "a.png", "text": "t"}, "[" * 100_000])
    with pytest.raises(DataError, match=r"metadata\.jsonl:2: not valid JSON"):
        imagefolder(str(tmp_path))


def _folder_next_to_a_secret(tmp_path):
    """tmp_path/outside_secret.png, and an imagefolder two levels below it holding a.png."""
    _png(tmp_path / "outside_secret.png", (1, 2, 3))
    root = tmp_path / "datasets" / "data"
    root.mkdir(parents=True)
    _png(root / "a.png", (0, 0, 0))
    return root


@pytest.mark.parametrize("name", ["../../outside_secret.png", "sub/../../../outside_secret.png", "absolute"])
def test_file_names_leading_outside_the_folder_are_refused(tmp_path, name):
    root = _folder_next_to_a_secret(tmp_path)
    if name == "absolute":
        name = str(tmp_path / "outside_secret.png")
    _write_metadata(root, [{"file_name": "a.png", "text": "t"}, {"file_name": name, "text": "t"}])
    with pytest.raises(DataError, match=r"metadata\.jsonl:2: file_name .* outside the dataset folder") as info:
        imagefolder(str(root))
    assert repr(name) in str(info.value) and "\n" not in str(info.value)


def test_symbolic_links_out_of_the_folder_are_refused(tmp_path):
    root = _folder_next_to_a_secret(tmp_path)
    os.symlink(tmp_path / "outside_secret.png", root / "link.png")
    os.symlink(tmp_path, root / "escape")
    for lineno, name in ((2, "link.png"), (2, "escape/outside_secret.png")):
        _write_metadata(root, [{"file_name": "a.png", "text": "t"}, {"file_name": name, "text": "t"}])
        with pytest.raises(DataError, match=rf"metadata\.jsonl:{lineno}: file_name '{name}' .*outside"):
            imagefolder(str(root))
    # a link that stays inside the folder is an ordinary file
    os.symlink(root / "a.png", root / "inner.png")
    _write_metadata(root, [{"file_name": "a.png", "text": "t"}, {"file_name": "inner.png", "text": "t"}])
    ds = imagefolder(str(root))
    assert torch.equal(ds.images[0], ds.images[1])


def test_images_smaller_than_the_minimum_resolution_are_refused(tmp_path):
    """Without resolution the images' own size is the model's resolution, so the floor that
    resolution=N has applies to it too; resolution=8 upscales them, as diffusers does."""
    _png(tmp_path / "a.png", (0, 0, 0), size=(4, 4))
    _png(tmp_path / "b.png", (0, 0, 0), size=(4, 4))
    _write_metadata(tmp_path, [{"file_name": "a.png", "text": "t"}, {"file_name": "b.png", "text": "t"}])
    with pytest.raises(DataError, match=r"images are 4x4 \(e\.g\. a\.png\), smaller than 8x8.*--resolution"):
        imagefolder(str(tmp_path))
    assert imagefolder(str(tmp_path), resolution=8).images.shape == (2, 3, 8, 8)


def test_unreadable_image_is_a_data_error(tmp_path):
    (tmp_path / "broken.png").write_bytes(b"this is not a png")
    _write_metadata(tmp_path, [{"file_name": "broken.png", "text": "t"}])
    with pytest.raises(DataError, match=r"'broken\.png'.*not a readable image"):
        imagefolder(str(tmp_path))


def test_roundtrip_of_pixel_values(tmp_path):
    arr = np.arange(8 * 8 * 3, dtype=np.uint8).reshape(8, 8, 3)
    Image.fromarray(arr).save(tmp_path / "grad.png")
    _write_metadata(tmp_path, [{"file_name": "grad.png", "text": "t"}])
    ds = imagefolder(str(tmp_path))
    expected = torch.from_numpy(arr.astype(np.float32)).permute(2, 0, 1) / 127.5 - 1.0
    torch.testing.assert_close(ds.images[0], expected)


# ---------------------------------------------------------------------------------------------
# resolution / center_crop / random_flip (diffusers' train_text_to_image preprocessing)
# ---------------------------------------------------------------------------------------------
import dataclasses  # noqa: E402

from invdiff.data.imagefolder import CROP_SEED, crop_box, resized_size  # noqa: E402

RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


def _to_tensor(arr):
    return torch.from_numpy(np.asarray(arr, dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1.0


def _noise(size, seed):
    w, h = size
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def _bands(size, outer, inner, vertical=True):
    """Three equal bands: outer | inner | outer, left to right (vertical=True) or top to bottom."""
    w, h = size
    arr = np.empty((h, w, 3), dtype=np.uint8)
    arr[...] = outer
    if vertical:
        arr[:, w // 3: 2 * w // 3] = inner
    else:
        arr[h // 3: 2 * h // 3, :] = inner
    return Image.fromarray(arr)


@pytest.fixture()
def mixed(tmp_path):
    """Non-square images of four different sizes (one greyscale, one RGBA, one smaller than 8)."""
    _noise((40, 24), 0).save(tmp_path / "wide.png")
    _noise((18, 50), 1).save(tmp_path / "tall.png")
    Image.new("L", (12, 9), 77).save(tmp_path / "grey.png")
    Image.new("RGBA", (6, 4), (10, 20, 30, 128)).save(tmp_path / "tiny.png")
    _write_metadata(
        tmp_path,
        [
            {"file_name": "wide.png", "text": "a photo of a waterbird", "place": "water"},
            {"file_name": "tall.png", "text": "a photo of a landbird", "place": "water"},
            {"file_name": "grey.png", "text": "a photo of a landbird", "place": "land"},
            {"file_name": "tiny.png", "text": "a photo of a waterbird", "place": "land"},
        ],
    )
    return tmp_path


def test_mixed_sizes_load_to_the_requested_square_resolution(mixed):
    for res in (8, 16, 33):
        ds = imagefolder(str(mixed), resolution=res)
        assert ds.images.shape == (4, 3, res, res) and ds.images.dtype == torch.float32
        assert ds.resolution == res
        assert float(ds.images.min()) >= -1.0 and float(ds.images.max()) <= 1.0
        # prompts, ids and attributes are unaffected by the resizing
        assert ds.prompts == ["a photo of a landbird", "a photo of a waterbird"]
        assert ds.prompt_ids.tolist() == [1, 0, 0, 1]
        assert ds.attributes["place"].tolist() == [1, 1, 0, 0]
        assert ds.info["resolution"] == res and ds.info["center_crop"] is True and ds.info["random_flip"] is False
        assert ds.info["interpolation"] == "bicubic"
    # a constant image stays constant whatever the resampling (greyscale -> RGB, alpha dropped)
    ds = imagefolder(str(mixed), resolution=8)
    torch.testing.assert_close(ds.images[2], torch.full((3, 8, 8), 77 / 127.5 - 1.0))
    torch.testing.assert_close(ds.images[3], _to_tensor(np.broadcast_to(np.array([10, 20, 30], np.uint8), (8, 8, 3))))


def test_resize_is_shorter_side_bicubic_then_center_crop(tmp_path):
    """Exactly PIL bicubic to shorter side == resolution (longer side truncated, like
    torchvision's Resize(int)), then torchvision's CenterCrop offsets."""
    wide, tall = _noise((37, 23), 3), _noise((20, 47), 4)
    wide.save(tmp_path / "wide.png")
    tall.save(tmp_path / "tall.png")
    _write_metadata(tmp_path, [{"file_name": "wide.png", "text": "t"}, {"file_name": "tall.png", "text": "t"}])
    ds = imagefolder(str(tmp_path), resolution=16)
    assert resized_size(37, 23, 16) == (25, 16)  # int(16 * 37 / 23) = 25
    assert resized_size(20, 47, 16) == (16, 37)  # int(37.6) = 37
    exp_wide = np.asarray(wide.resize((25, 16), Image.Resampling.BICUBIC))[:, 4:20]  # round(4.5) == 4
    exp_tall = np.asarray(tall.resize((16, 37), Image.Resampling.BICUBIC))[10:26, :]  # round(10.5) == 10
    torch.testing.assert_close(ds.images[0], _to_tensor(exp_wide), rtol=0, atol=0)
    torch.testing.assert_close(ds.images[1], _to_tensor(exp_tall), rtol=0, atol=0)


def test_center_crop_keeps_the_center(tmp_path):
    # red | green | red bands; the square centre of each image is all green
    _bands((30, 10), RED, GREEN).save(tmp_path / "exact.png")  # shorter side already 10: no resize
    _bands((60, 20), RED, GREEN).save(tmp_path / "down.png")  # resized to 30x10, then cropped
    _bands((10, 30), BLUE, GREEN, vertical=False).save(tmp_path / "tall.png")  # blue / green / blue
    _write_metadata(tmp_path, [{"file_name": n, "text": "t"} for n in ("exact.png", "down.png", "tall.png")])
    ds = imagefolder(str(tmp_path), resolution=10)
    green = _to_tensor(np.broadcast_to(np.array(GREEN, np.uint8), (10, 10, 3)))
    torch.testing.assert_close(ds.images[0], green, rtol=0, atol=0)
    torch.testing.assert_close(ds.images[2], green, rtol=0, atol=0)
    # after a 2x bicubic downscale only the edge columns may blend with the red bands
    torch.testing.assert_close(ds.images[1][:, :, 2:8], green[:, :, 2:8], rtol=0, atol=2 / 127.5)
    assert float(ds.images[1][1].mean()) > 0.8  # overwhelmingly green, not a crop of the red side
    # the same images uncropped would show the bands: a top-left crop would be red/blue
    assert crop_box(30, 10, 10, True, 0) == (10, 0) and crop_box(10, 30, 10, True, 0) == (0, 10)


def test_non_center_crop_is_deterministic_and_follows_the_sample_index(tmp_path):
    names = [f"img{i}.png" for i in range(8)]
    sources = [_noise((40, 16), 10 + i) for i in range(8)]
    for name, im in zip(names, sources):
        im.save(tmp_path / name)
    _write_metadata(tmp_path, [{"file_name": n, "text": "t"} for n in names])
    a = imagefolder(str(tmp_path), resolution=16, center_crop=False)
    b = imagefolder(str(tmp_path), resolution=16, center_crop=False)
    assert torch.equal(a.images, b.images)  # loading twice gives identical tensors
    assert a.info["center_crop"] is False and a.info["crop_seed"] == CROP_SEED
    offsets = []
    for i, im in enumerate(sources):
        left, top = crop_box(40, 16, 16, False, i)
        assert top == 0 and 0 <= left <= 40 - 16  # RandomCrop's range: only the long side moves
        assert crop_box(40, 16, 16, False, i) == (left, top)  # a pure function of the index
        expected = np.asarray(im)[:, left:left + 16]  # no resize: the shorter side is already 16
        torch.testing.assert_close(a.images[i], _to_tensor(expected), rtol=0, atol=0)
        offsets.append(left)
    assert len(set(offsets)) > 1  # not one fixed offset for every image
    centred = imagefolder(str(tmp_path), resolution=16)
    assert not torch.equal(centred.images, a.images)
    assert "crop_seed" not in centred.info


def test_random_flip_is_recorded_not_applied_and_survives_views(mixed):
    plain = imagefolder(str(mixed), resolution=8)
    assert plain.random_flip is False
    ds = imagefolder(str(mixed), resolution=8, random_flip=True)
    assert ds.random_flip is True and ds.info["random_flip"] is True
    assert torch.equal(ds.images, plain.images)  # nothing is flipped at load time
    view = ds.training_view()
    assert view.random_flip is True and view.attributes is None
    sub = ds.subset(torch.tensor([3, 1]))
    assert sub.random_flip is True and len(sub) == 2 and sub.sample_ids.tolist() == [3, 1]
    assert sub.training_view().random_flip is True
    assert dataclasses.replace(ds, name="other").random_flip is True
    assert dataclasses.replace(ds, random_flip=False).random_flip is False


def test_load_dataset_passes_the_options_through(mixed):
    ds = load_dataset(str(mixed), resolution=12, center_crop=False, random_flip=True)
    direct = imagefolder(str(mixed), resolution=12, center_crop=False, random_flip=True)
    assert torch.equal(ds.images, direct.images)
    assert ds.random_flip is True
    assert ds.info["resolution"] == 12 and ds.info["center_crop"] is False
    # positional use as before: (spec, split, bias, num_colors, resolution, seed)
    assert load_dataset(str(mixed), "train", 0.9, 2, 8, 0).images.shape == (4, 3, 8, 8)


def test_load_dataset_colored_digits_keeps_its_default_and_records_random_flip():
    ds = load_dataset("colored-digits")
    assert ds.resolution == 16 and ds.random_flip is False
    flipped = load_dataset("colored-digits", resolution=8, random_flip=True)
    assert flipped.resolution == 8 and flipped.random_flip is True
    assert flipped.subset(torch.arange(3)).random_flip is True


def test_without_resolution_mixed_sizes_suggest_resolution(mixed):
    with pytest.raises(DataError, match=r"mixed sizes: .*--resolution"):
        imagefolder(str(mixed))
    with pytest.raises(DataError, match=r"mixed sizes: .*--resolution"):
        load_dataset(str(mixed))


def test_without_resolution_non_square_suggests_resolution(tmp_path):
    _png(tmp_path / "wide.png", (0, 0, 0), size=(8, 4))
    _write_metadata(tmp_path, [{"file_name": "wide.png", "text": "t"}])
    with pytest.raises(DataError, match=r"square, got 4x8 \(e\.g\. wide\.png\).*--resolution"):
        imagefolder(str(tmp_path))
    assert imagefolder(str(tmp_path), resolution=8).images.shape == (1, 3, 8, 8)


def test_without_resolution_info_records_the_defaults(folder):
    ds = imagefolder(str(folder))
    assert ds.info["resolution"] is None and ds.info["center_crop"] is True and ds.info["random_flip"] is False
    assert ds.random_flip is False and ds.resolution == 8


@pytest.mark.parametrize(
    "kwargs, msg",
    [
        ({"resolution": 7}, r"resolution must be >= 8, got 7"),
        ({"resolution": 0}, r"resolution must be >= 8, got 0"),
        ({"resolution": -64}, r"resolution must be >= 8"),
        ({"resolution": 64.0}, r"resolution must be an integer"),
        ({"resolution": "512"}, r"resolution must be an integer"),
        ({"resolution": True}, r"resolution must be an integer"),
        ({"resolution": 16, "center_crop": "no"}, r"center_crop must be True or False"),
        ({"resolution": 16, "random_flip": 1}, r"random_flip must be True or False"),
    ],
)
def test_bad_options_are_data_errors(folder, kwargs, msg):
    with pytest.raises(DataError, match=msg):
        imagefolder(str(folder), **kwargs)


def test_bad_options_are_checked_before_touching_the_folder(tmp_path):
    with pytest.raises(DataError, match=r"resolution must be >= 8"):
        imagefolder(str(tmp_path / "nope"), resolution=4)


def test_unreadable_image_with_resolution_is_a_data_error(tmp_path):
    _noise((20, 12), 0).save(tmp_path / "ok.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    _write_metadata(tmp_path, [{"file_name": "ok.png", "text": "t"}, {"file_name": "broken.png", "text": "t"}])
    with pytest.raises(DataError, match=r"'broken\.png'.*not a readable image"):
        imagefolder(str(tmp_path), resolution=8)


def test_pixels_are_decoded_when_used_with_the_same_values_whole_or_by_rows(mixed, monkeypatch):
    """Loading reads headers only; views, subsets and sizes decode nothing; `images` (the
    pixel-space path) and `load_images(rows)` (the latent path) decode the same values, and a
    subset keeps each row's crop (seeded by its place in metadata.jsonl)."""
    import invdiff.data.imagefolder as imagefolder_module

    decoded = []
    load_rgb = imagefolder_module._load_rgb
    monkeypatch.setattr(imagefolder_module, "_load_rgb", lambda path, *a: (decoded.append(os.path.basename(path)), load_rgb(path, *a))[1])
    ds = imagefolder(str(mixed), resolution=12, center_crop=False)
    view, sub = ds.training_view(), ds.subset(torch.tensor([3, 1]))
    assert (len(ds), ds.resolution, ds.channels, len(sub), sub.resolution) == (4, 12, 3, 2, 12)
    assert view.attributes is None and sub.attributes["place"].tolist() == [0, 1] and sub.sample_ids.tolist() == [3, 1]
    assert decoded == []
    rows = ds.load_images(torch.tensor([2, 0]))
    assert decoded == ["grey.png", "wide.png"]
    whole = ds.images
    assert whole.shape == (4, 3, 12, 12) and whole.dtype == torch.float32 and len(decoded) == 6
    assert ds.images is whole  # decoded once, then kept
    assert torch.equal(rows, whole[[2, 0]]) and torch.equal(ds.load_images(torch.tensor([1])), whole[[1]])
    assert torch.equal(sub.images, whole[[3, 1]]) and torch.equal(view.images, whole)


def test_fingerprint_follows_the_files_and_the_resize_settings(mixed):
    fingerprint = imagefolder(str(mixed), resolution=12).files.fingerprint()
    assert imagefolder(str(mixed), resolution=12).files.fingerprint() == fingerprint
    assert imagefolder(str(mixed), resolution=16).files.fingerprint() != fingerprint
    assert imagefolder(str(mixed), resolution=12, center_crop=False).files.fingerprint() != fingerprint
    assert imagefolder(str(mixed), resolution=12).subset(torch.tensor([0, 1])).files.fingerprint() != fingerprint
    _noise((40, 24), 99).save(mixed / "wide.png")  # same size on disk and in pixels, other content
    stat = os.stat(mixed / "wide.png")
    os.utime(mixed / "wide.png", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # kernel file times are coarse
    assert imagefolder(str(mixed), resolution=12).files.fingerprint() != fingerprint


def test_a_truncated_image_is_a_data_error_when_decoded(tmp_path):
    """Loading reads headers only, so a file cut short after its header is found when its pixels
    are decoded: still a DataError that names it."""
    _noise((8, 8), 0).save(tmp_path / "whole.png")
    data = (tmp_path / "whole.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    _write_metadata(tmp_path, [{"file_name": "whole.png", "text": "t"}, {"file_name": "cut.png", "text": "t"}])
    ds = imagefolder(str(tmp_path))
    assert ds.load_images(torch.tensor([0])).shape == (1, 3, 8, 8)
    with pytest.raises(DataError, match=r"'cut\.png'.*not a readable image"):
        ds.images


# ---------------------------------------------------------------------------------------------
# size bounds: a side past limits.MAX_IMAGE_SIDE, or pixels the memory cannot hold, is one line
# before they are allocated
# ---------------------------------------------------------------------------------------------
import time  # noqa: E402
import zlib  # noqa: E402

import invdiff.data.imagefolder as imagefolder_module  # noqa: E402
import invdiff.limits  # noqa: E402
from invdiff.limits import MAX_IMAGE_SIDE  # noqa: E402


@pytest.fixture()
def no_decoding(monkeypatch):
    """Decoding any image's pixels fails the test."""
    def forbidden(*args, **kwargs):
        raise AssertionError("pixels were decoded before their size was checked")

    monkeypatch.setattr(imagefolder_module, "_load_rgb", forbidden)


def test_a_resolution_past_the_cap_is_refused_at_once(folder, no_decoding):
    start = time.perf_counter()
    for load in (lambda: imagefolder(str(folder), resolution=60_000),
                 lambda: load_dataset(str(folder), resolution=60_000)):
        with pytest.raises(ValueError) as info:
            load()
        assert str(info.value) == "--resolution is 60000 pixels; invdiff's cap is 4096 (invdiff/limits.py)"
    assert time.perf_counter() - start < 1.0
    assert imagefolder(str(folder), resolution=MAX_IMAGE_SIDE).resolution == MAX_IMAGE_SIDE  # the cap itself is allowed


def test_images_larger_than_the_cap_need_a_resolution(tmp_path):
    side = MAX_IMAGE_SIDE + 4
    Image.new("1", (side, side)).save(tmp_path / "big.png")  # 1 bit a pixel: a small file, quick to write
    _write_metadata(tmp_path, [{"file_name": "big.png", "text": "t"}])
    with pytest.raises(DataError, match=rf"images are {side}x{side} \(e\.g\. big\.png\), larger than invdiff's cap "
                                        rf"of {MAX_IMAGE_SIDE} pixels a side .*--resolution N"):
        imagefolder(str(tmp_path))


@pytest.mark.parametrize("resolution, hint", [(None, "pass --resolution N to resize the images smaller"),
                                              (8, "lower --resolution")])
def test_pixels_the_memory_cannot_hold_are_refused_before_decoding(folder, monkeypatch, resolution, hint):
    """Loading reads headers only; the whole (N, 3, R, R) fp32 tensor is checked against the free
    memory when it is asked for, before it is allocated or any image decoded. A batch of rows
    that fits still loads."""
    monkeypatch.setattr(invdiff.limits, "available_memory_bytes", lambda: 2000)  # a budget of 1600 bytes
    ds = imagefolder(str(folder), resolution=resolution)  # 4 images of 3x8x8 fp32: 3072 bytes, 768 each
    assert ds.load_images(torch.tensor([1])).shape == (1, 3, 8, 8)
    monkeypatch.setattr(imagefolder_module, "_load_rgb", lambda *a: pytest.fail("decoded before the check"))
    with pytest.raises(ValueError) as info:
        ds.images
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith(f"4 images of 8x8 from {str(folder)!r} (fp32) would need 3.0 KB of memory")
    assert msg.endswith(hint)


def test_a_narrow_image_resized_past_the_memory_is_refused_when_loading(tmp_path, no_decoding, monkeypatch):
    """resolution=N resizes the shorter side to N: the longer side of an 8 x 20000 strip grows
    with it (4096 x 10240000 pixels, 168 GB in PIL) before the crop."""
    Image.new("L", (8, 20_000)).save(tmp_path / "strip.png")
    _write_metadata(tmp_path, [{"file_name": "strip.png", "text": "t"}])
    monkeypatch.setattr(invdiff.limits, "available_memory_bytes", lambda: 8 << 30)  # 8 GB free
    with pytest.raises(ValueError, match=r"resizing 'strip\.png' in .* to --resolution 4096 on its shorter side would "
                                         r"need 156\.2 GB.*; lower --resolution, or crop that image"):
        imagefolder(str(tmp_path), resolution=4096)
    assert imagefolder(str(tmp_path), resolution=8).resolution == 8  # 8 x 20000: 640 kB


# ---------------------------------------------------------------------------------------------
# bit depth: 16-bit images are scaled to 8 bits, not clipped; modes that cannot be scaled are
# refused naming the file and the mode
# ---------------------------------------------------------------------------------------------


def _png16(path, samples, color_type):
    """A 16-bit PNG written byte by byte (PIL cannot write 16-bit RGB): samples (H, W) grey
    (color_type 0) or (H, W, 3) RGB (color_type 2)."""
    import struct

    samples = np.asarray(samples, dtype=">u2")
    height, width = samples.shape[:2]
    raw = b"".join(b"\x00" + samples[y].tobytes() for y in range(height))  # filter 0 on each row

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 16, color_type, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def _eight_bit(values):
    """round(v / 257) in [-1, 1], as the loaded tensor holds it."""
    return torch.tensor(np.round(np.asarray(values) / 257.0), dtype=torch.float32) / 127.5 - 1.0


def test_a_16_bit_greyscale_png_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 128, 129, 32768], [257 * 100, 40000, 65280, 65535]] * 4, dtype=np.uint16)
    values = np.tile(values, (1, 2))  # 8 x 8
    Image.fromarray(values).save(tmp_path / "pil.png")  # PIL writes mode "I;16"
    _png16(tmp_path / "raw.png", values, color_type=0)  # big-endian samples, as any tool writes them
    Image.fromarray(values).save(tmp_path / "grey.tiff")
    names = ["pil.png", "raw.png", "grey.tiff"]
    assert {Image.open(tmp_path / n).mode for n in names} <= {"I;16", "I;16B", "I;16L"}
    _write_metadata(tmp_path, [{"file_name": n, "text": "t"} for n in names])
    ds = imagefolder(str(tmp_path))
    expected = _eight_bit(values).expand(3, 8, 8)
    for i, name in enumerate(names):
        torch.testing.assert_close(ds.images[i], expected, rtol=0, atol=0, msg=name)
    assert round((float(ds.images[0, 0, 0, 3]) + 1) * 127.5) == 128  # mid-grey 32768 is 128, not white (255)


def test_a_16_bit_greyscale_png_resizes_like_its_8_bit_self(tmp_path):
    Image.fromarray(np.full((16, 24), 32768, dtype=np.uint16)).save(tmp_path / "sixteen.png")
    Image.new("L", (24, 16), 128).save(tmp_path / "eight.png")
    _write_metadata(tmp_path, [{"file_name": "sixteen.png", "text": "t"}, {"file_name": "eight.png", "text": "t"}])
    images = imagefolder(str(tmp_path), resolution=8).images
    assert torch.equal(images[0], images[1])


def test_a_48_bit_rgb_png_loads_within_one_level_of_its_scaled_values(tmp_path):
    """PIL opens a 16-bit RGB PNG as 8-bit RGB keeping each sample's high byte, floor(v / 256):
    never more than one level from round(v / 257), and mid-grey stays mid-grey."""
    values = np.zeros((8, 8, 3), dtype=np.uint16)
    values[..., 0], values[..., 1], values[..., 2] = 32768, 65535, 300
    values[4:] = 65280
    _png16(tmp_path / "rgb48.png", values, color_type=2)
    _write_metadata(tmp_path, [{"file_name": "rgb48.png", "text": "t"}])
    loaded = imagefolder(str(tmp_path)).images[0]
    expected = _eight_bit(values).permute(2, 0, 1)
    assert float((loaded - expected).abs().max()) <= 1 / 127.5 + 1e-6
    assert loaded[:, 0, 0].tolist() == _eight_bit([32768, 65535, 300]).tolist()


@pytest.mark.parametrize("array, mode, kind", [
    (np.full((8, 8), 0.5, dtype=np.float32), "F", "32-bit floating-point"),
    (np.full((8, 8), 70000, dtype=np.int32), "I", "32-bit integer"),
])
def test_modes_that_cannot_be_scaled_are_refused_naming_file_and_mode(tmp_path, no_decoding, array, mode, kind):
    Image.fromarray(array).save(tmp_path / "odd.tiff")
    assert Image.open(tmp_path / "odd.tiff").mode == mode
    _write_metadata(tmp_path, [{"file_name": "odd.tiff", "text": "t"}])
    with pytest.raises(DataError) as info:
        imagefolder(str(tmp_path), resolution=8)
    assert str(info.value) == (f"'odd.tiff' in {str(tmp_path)!r} is a {kind} image (PIL mode {mode!r}), which invdiff "
                               "cannot scale to 8 bits a channel unambiguously; save it as an 8- or 16-bit RGB or "
                               "greyscale PNG")
