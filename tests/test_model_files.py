"""Sizes read from a model folder's files are checked and bounded; a damaged config is one line.

`invdiff sample` asks `sampling_size` (invdiff/model_folders/kinds.py) for the size to draw at before it
loads anything. A UNet config.json or a run's invdiff_run.json that is damaged (not a JSON
object, a missing or mistyped size, a size past limits.MAX_IMAGE_SIDE) must be one line naming
the file and the key, not a TypeError, KeyError, ZeroDivisionError or a MemoryError after the
model has loaded. The folders here hold only the JSON files that sampling_size reads, copied from
the tiny SD folder (conftest.tiny_sd: VAE factor 2, sample_size 8) and the tiny embedded base.
"""
import json
import os
import re
import shutil
import subprocess
import sys

import pytest

import invdiff.model_folders.load
from invdiff.cli import main
from invdiff.errors import CheckpointError
from invdiff.limits import MAX_IMAGE_SIDE
from invdiff.model_folders import RUN_META, check_image_size, read_json_object, sampling_size

MISSING = object()  # a key to leave out of a file


def _one_line(exc) -> str:
    text = str(exc.value)
    assert "\n" not in text and "\r" not in text, text
    return text


def _edit_json(path, **changes):
    with open(path) as f:
        data = json.load(f)
    for key, value in changes.items():
        if value is MISSING:
            data.pop(key, None)
        else:
            data[key] = value
    with open(path, "w") as f:
        json.dump(data, f)


@pytest.fixture()
def sd_configs(tiny_sd, tmp_path):
    """The config files of the tiny SD folder (no weights: sampling_size reads nothing else)."""
    folder = tmp_path / "sd"
    for name in ("model_index.json", "unet/config.json", "vae/config.json"):
        os.makedirs(folder / os.path.dirname(name), exist_ok=True)
        shutil.copy(os.path.join(tiny_sd, name), folder / name)
    return str(folder)


@pytest.fixture()
def base_copy(tiny_base_dir, tmp_path):
    """A private copy of the tiny embedded base (a few hundred kB), for a test to damage."""
    return shutil.copytree(tiny_base_dir, str(tmp_path / "base"))


def _referring_run(tmp_path, **changes):
    """A run folder that refers to its SD base (models/base_reference.py): its invdiff_run.json
    records the VAE factor and the resolution it trained at; nothing else is read for its size."""
    run = tmp_path / "run"
    run.mkdir()
    meta = {"kind": "invdiff-run", "vae_factor": 2, "resolution": 12,
            "base_reference": {"hub_id": "org/name", "revision": "0" * 40}}
    with open(run / RUN_META, "w") as f:
        json.dump(meta, f)
    _edit_json(run / RUN_META, **changes)
    return str(run)


# ---------------------------------------------------------------------------- the UNet's config


def test_the_undamaged_folders_still_give_their_sizes(sd_configs, tmp_path):
    assert sampling_size(sd_configs) == (16, 16)  # sample_size 8 x VAE factor 2
    assert sampling_size(_referring_run(tmp_path)) == (12, 12)
    assert sampling_size(sd_configs, 8, 20) == (8, 20)


def test_a_height_width_pair_of_sample_size_is_taken(sd_configs):
    """diffusers takes sample_size as one integer or a [height, width] pair."""
    _edit_json(os.path.join(sd_configs, "unet", "config.json"), sample_size=[8, 4])
    assert sampling_size(sd_configs) == (16, 8)
    assert sampling_size(sd_configs, width=12) == (16, 12)


@pytest.mark.parametrize("value, message", [
    ("abc", "'sample_size' must be a positive integer, got 'abc'"),
    ("64", "'sample_size' must be a positive integer, got '64'"),
    (0, "'sample_size' must be a positive integer, got 0"),
    (-8, "'sample_size' must be a positive integer, got -8"),
    (8.5, "'sample_size' must be a positive integer, got 8.5"),
    (True, "'sample_size' must be a positive integer, got True"),
    (None, "'sample_size' must be a positive integer, got None"),
    ([64], "'sample_size' must be a positive integer or a [height, width] pair of them, got [64]"),
    ([8, "x"], "'sample_size' must be a positive integer or a [height, width] pair of them, got [8, 'x']"),
    (MISSING, "'sample_size' is missing"),
    ("x" * 10_000, "'sample_size' must be a positive integer, got 'xxxxx"),  # cut short, one line
])
def test_a_damaged_sample_size_is_one_line_naming_the_file_and_key(sd_configs, value, message):
    config = os.path.join(sd_configs, "unet", "config.json")
    _edit_json(config, sample_size=value)
    with pytest.raises(CheckpointError) as exc:
        sampling_size(sd_configs)
    text = _one_line(exc)
    assert text.startswith(f"{config}: ") and message in text and len(text) < 300, text


@pytest.mark.parametrize("value, message", [
    (200_000, "'sample_size' is 200000 pixels"),  # past the cap in latent cells already
    (2049, "'sample_size' x the VAE's downsampling factor 2 is 4098 pixels"),
    ([8, 2049], "'sample_size' x the VAE's downsampling factor 2 is 4098 pixels"),
])
def test_a_sample_size_past_the_cap_is_refused(sd_configs, value, message):
    config = os.path.join(sd_configs, "unet", "config.json")
    _edit_json(config, sample_size=value)
    with pytest.raises(CheckpointError) as exc:
        sampling_size(sd_configs)
    assert _one_line(exc).startswith(f"{config}: {message}; invdiff's cap is {MAX_IMAGE_SIDE}"), exc.value


@pytest.mark.parametrize("content, message", [
    ("[]", "the UNet's config at .*unet/config.json is corrupt: it holds a JSON list, not an object"),
    ('"text"', "is corrupt: it holds a JSON str, not an object"),
    ('{"sample_size": 8', "the UNet's config at .*unet/config.json is corrupt: "),
    (b"\xff\xfe\x00garbage", "the UNet's config at .*unet/config.json is corrupt: "),
    ("[" * 100_000, "is corrupt: nested too deeply"),
])
def test_a_unet_config_that_is_no_json_object_is_one_line(sd_configs, content, message):
    with open(os.path.join(sd_configs, "unet", "config.json"), "wb") as f:
        f.write(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(CheckpointError) as exc:
        sampling_size(sd_configs)
    assert re.search(message, _one_line(exc))


def test_a_missing_unet_config_is_named(sd_configs):
    os.remove(os.path.join(sd_configs, "unet", "config.json"))
    with pytest.raises(CheckpointError, match=r"the UNet's config not found: .*unet/config\.json"):
        sampling_size(sd_configs)


def test_sample_size_is_not_needed_when_both_sides_are_given(sd_configs):
    """A config without sample_size can still be sampled at a size given in full; a present but
    damaged one is refused all the same."""
    config = os.path.join(sd_configs, "unet", "config.json")
    _edit_json(config, sample_size=MISSING)
    assert sampling_size(sd_configs, 8, 12) == (8, 12)
    _edit_json(config, sample_size="abc")
    with pytest.raises(CheckpointError, match="'sample_size' must be a positive integer"):
        sampling_size(sd_configs, 8, 12)


@pytest.mark.parametrize("blocks, message", [
    (MISSING, "'block_out_channels' must be a non-empty list (the VAE's down blocks), got nothing"),
    ([], "'block_out_channels' must be a non-empty list"),
    ("abc", "'block_out_channels' must be a non-empty list (the VAE's down blocks), got 'abc'"),
    ([8] * 14, "'block_out_channels' lists 14 down blocks, a latent cell of 2 ** 13 pixels"),
    ([8] * 100_000, "'block_out_channels' lists 100000 down blocks"),
])
def test_a_damaged_vae_config_is_one_line(sd_configs, blocks, message):
    config = os.path.join(sd_configs, "vae", "config.json")
    _edit_json(config, block_out_channels=blocks)
    with pytest.raises(CheckpointError) as exc:
        sampling_size(sd_configs)
    text = _one_line(exc)
    assert text.startswith(f"{config}: ") and message in text, text


# ------------------------------------------------------------------------ a run's invdiff_run.json


@pytest.mark.parametrize("changes, message", [
    ({"vae_factor": 0}, "'vae_factor' must be a positive power of two (the VAE's pixels per latent cell), got 0"),
    ({"vae_factor": 3}, "'vae_factor' must be a positive power of two"),
    ({"vae_factor": "8"}, "'vae_factor' must be a positive power of two (the VAE's pixels per latent cell), got '8'"),
    ({"vae_factor": True}, "'vae_factor' must be a positive power of two"),
    ({"vae_factor": MISSING}, "'vae_factor' must be a positive power of two (the VAE's pixels per latent cell), got None"),
    ({"vae_factor": 8192}, f"'vae_factor' is 8192 pixels; invdiff's cap is {MAX_IMAGE_SIDE}"),
    ({"resolution": [16]}, "'resolution' must be a positive integer (the pixel size the run trained at), got [16]"),
    ({"resolution": 300_000}, f"'resolution' is 300000 pixels; invdiff's cap is {MAX_IMAGE_SIDE}"),
    ({"resolution": 0}, "'resolution' must be a positive integer"),
    ({"resolution": "12"}, "'resolution' must be a positive integer (the pixel size the run trained at), got '12'"),
    ({"resolution": MISSING}, "'resolution' must be a positive integer (the pixel size the run trained at), got nothing"),
    ({"resolution": 13}, "'resolution' 13 is not a multiple of the VAE's downsampling factor 2"),
])
def test_damaged_run_metadata_is_one_line_naming_the_file_and_key(tmp_path, changes, message):
    run = _referring_run(tmp_path, **changes)
    with pytest.raises(CheckpointError) as exc:
        sampling_size(run)
    text = _one_line(exc)
    assert text.startswith(f"{os.path.join(run, RUN_META)}: ") and message in text, text


@pytest.mark.parametrize("content, message", [
    ("[]", "run metadata at .* is corrupt: it holds a JSON list, not an object"),
    ("{", "run metadata at .* is corrupt: "),
])
def test_run_metadata_that_is_no_json_object_is_one_line(tmp_path, content, message):
    run = _referring_run(tmp_path)
    with open(os.path.join(run, RUN_META), "w") as f:
        f.write(content)
    with pytest.raises(CheckpointError) as exc:
        sampling_size(run)
    assert re.search(message, _one_line(exc))


def test_an_embedded_run_checks_its_recorded_resolution(base_copy, tmp_path):
    """An embedded-base run folder (base/ inside) samples at the --resolution it recorded under
    'data', else at its base's sample_size; a damaged one is named."""
    run = tmp_path / "embedded_run"
    shutil.copytree(base_copy, run / "base")
    with open(os.path.join(base_copy, "unet", "config.json")) as f:
        native = json.load(f)["sample_size"]
    for data, expected in (({"resolution": None}, native), ({}, native), ({"resolution": native}, native)):
        (run / RUN_META).write_text(json.dumps({"kind": "invdiff-run", "data": data}))
        assert sampling_size(str(run)) == (expected, expected)
    for data, message in (({"resolution": "abc"}, "'data.resolution' must be a positive integer"),
                          ({"resolution": 60_000}, "'data.resolution' is 60000 pixels"),
                          ("colored-digits", "'data' must be an object")):
        (run / RUN_META).write_text(json.dumps({"kind": "invdiff-run", "data": data}))
        with pytest.raises(CheckpointError) as exc:
            sampling_size(str(run))
        assert message in _one_line(exc)


# ----------------------------------------------------------------------------- the given sizes


@pytest.mark.parametrize("height, width, message", [
    (100_000, None, f"--height is 100000 pixels; invdiff's cap is {MAX_IMAGE_SIDE}"),
    (None, 100_000, f"--width is 100000 pixels; invdiff's cap is {MAX_IMAGE_SIDE}"),
    (MAX_IMAGE_SIDE + 2, None, f"--height is {MAX_IMAGE_SIDE + 2} pixels"),
    (0, None, "--height must be a positive integer, got 0"),
    ("64", None, "--height must be a positive integer, got '64'"),
    (None, 13, "--width 13 is not a multiple of the VAE's downsampling factor 2"),
])
def test_given_sizes_are_checked_and_capped(sd_configs, height, width, message):
    with pytest.raises(ValueError) as exc:
        sampling_size(sd_configs, height, width)
    assert message in _one_line(exc)
    assert not isinstance(exc.value, CheckpointError)  # the user's flag, not a damaged file


def test_the_cap_itself_is_allowed(sd_configs):
    assert sampling_size(sd_configs, MAX_IMAGE_SIDE, MAX_IMAGE_SIDE) == (MAX_IMAGE_SIDE, MAX_IMAGE_SIDE)


def test_a_size_past_the_cap_is_refused_even_for_a_path_that_is_no_model(tmp_path):
    with pytest.raises(ValueError, match="--height is 100000 pixels"):
        sampling_size(str(tmp_path / "nothing"), 100_000)
    assert sampling_size(str(tmp_path / "nothing"), 8) == (8, None)  # passed through for load_model to name


def test_the_python_sampler_checks_sizes_the_same_way():
    """sampling.spec.check_image_size is the same function: the cap holds for sample(height=...) too."""
    from invdiff.sampling.spec import check_image_size as spec_check

    assert spec_check is check_image_size
    with pytest.raises(ValueError, match="height is 100000 pixels"):
        check_image_size(100_000, 1, "height")


# ---------------------------------------------------------------------- the embedded base's load


@pytest.mark.parametrize("value, message", [
    ("abc", "'sample_size' must be a positive integer, got 'abc'"),
    (MISSING, "'sample_size' is missing"),
    (200_000, f"'sample_size' is 200000 pixels; invdiff's cap is {MAX_IMAGE_SIDE}"),
])
def test_an_embedded_base_with_a_damaged_unet_config_is_one_line(base_copy, value, message):
    from invdiff.models.base import FrozenBase

    config = os.path.join(base_copy, "unet", "config.json")
    _edit_json(config, sample_size=value)
    for load in (FrozenBase.from_pretrained, invdiff.model_folders.load.load_model, sampling_size):
        with pytest.raises(CheckpointError) as exc:
            load(base_copy)
        text = _one_line(exc)
        assert text.startswith(f"{config}: ") and message in text, (load, text)


def test_an_embedded_base_whose_files_are_no_json_objects_is_one_line(base_copy):
    from invdiff.models.base import BASE_META, FrozenBase

    with open(os.path.join(base_copy, "unet", "config.json"), "w") as f:
        f.write("[]")
    with pytest.raises(CheckpointError, match="the UNet's config at .* is corrupt: it holds a JSON list"):
        FrozenBase.from_pretrained(base_copy)
    with open(os.path.join(base_copy, BASE_META), "w") as f:
        f.write("[1, 2]")
    with pytest.raises(CheckpointError, match="base model metadata at .* is corrupt: it holds a JSON list"):
        FrozenBase.from_pretrained(base_copy)


def test_read_json_object_names_the_file(tmp_path):
    path = tmp_path / "x.json"
    path.write_text('{"a": 1}')
    assert read_json_object(str(path), "a thing") == {"a": 1}
    path.write_text("7")
    with pytest.raises(CheckpointError, match=r"a thing at .*x\.json is corrupt: it holds a JSON int, not an object"):
        read_json_object(str(path), "a thing")
    with pytest.raises(CheckpointError, match=r"a thing not found: .*y\.json"):
        read_json_object(str(tmp_path / "y.json"), "a thing")


# ----------------------------------------------------------------------------- the command line


@pytest.mark.parametrize("damage", ["sample_size", "vae_factor"])
def test_the_sample_command_refuses_a_damaged_file_in_one_line_before_any_load(sd_configs, tmp_path, capsys,
                                                                                 monkeypatch, damage):
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before its files were checked")

    monkeypatch.setattr(invdiff.model_folders.load, "load_model", refuse)
    if damage == "sample_size":
        model, key = sd_configs, "'sample_size'"
        _edit_json(os.path.join(sd_configs, "unet", "config.json"), sample_size="abc")
    else:
        model, key = _referring_run(tmp_path, vae_factor=0), "'vae_factor'"
    out = str(tmp_path / "samples")
    rc = main(["sample", "--model", model, "--prompt", "a red square", "--num", "1", "--steps", "1", "--out", out])
    err = [line for line in re.split(r"[\r\n]", capsys.readouterr().err) if line.strip()]
    assert rc == 2 and len(err) == 1 and key in err[0], err
    assert not os.path.exists(out)


def test_model_folders_imports_neither_torch_nor_diffusers():
    """The command line refuses bad sizes through it before importing anything heavy."""
    code = ("import sys, invdiff.model_folders; "
            "print(sorted(m for m in ('torch', 'diffusers', 'transformers', 'numpy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
