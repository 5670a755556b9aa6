"""Atomic writes and checked reads (invdiff.io)."""
from __future__ import annotations

import json
import os
import stat

import pytest
import torch

from invdiff import io as iio
from invdiff.io import CheckpointError
from tests.utils import file_modes, umask_modes, using_umask


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_atomic_write_json_writes_sorted_json(tmp_path):
    path = str(tmp_path / "sub" / "a.json")  # the folder is created
    iio.atomic_write_json(path, {"b": 1, "a": [1, 2]})
    with open(path) as f:
        text = f.read()
    assert json.loads(text) == {"a": [1, 2], "b": 1}
    assert text.index('"a"') < text.index('"b"') and text.endswith("\n")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o666 & ~_umask()


def test_atomic_write_json_keeps_old_file_when_write_fails(tmp_path, monkeypatch):
    path = tmp_path / "state.json"
    iio.atomic_write_json(str(path), {"version": 1})
    before = path.read_bytes()

    def exploding_dump(obj, f, **kwargs):
        f.write('{"version": 2, "half": ')  # half a file reaches the disk ...
        f.flush()
        raise RuntimeError("disk full")  # ... then the write dies

    monkeypatch.setattr(json, "dump", exploding_dump)
    with pytest.raises(RuntimeError, match="disk full"):
        iio.atomic_write_json(str(path), {"version": 2})
    assert path.read_bytes() == before
    assert json.loads(before) == {"version": 1}
    assert os.listdir(tmp_path) == ["state.json"]  # no temporary file left behind


def test_atomic_write_json_fails_cleanly_without_old_file(tmp_path, monkeypatch):
    monkeypatch.setattr(json, "dump", lambda *a, **k: (_ for _ in ()).throw(OSError("boom")))
    with pytest.raises(OSError, match="boom"):
        iio.atomic_write_json(str(tmp_path / "new.json"), {"x": 1})
    assert os.listdir(tmp_path) == []


def test_atomic_write_text_and_safetensors(tmp_path):
    iio.atomic_write_text(str(tmp_path / "t.txt"), "hello\n")
    assert (tmp_path / "t.txt").read_text() == "hello\n"
    t = {"w": torch.arange(6.0).view(2, 3).t()}  # non-contiguous is fine
    iio.atomic_save_file(t, str(tmp_path / "w.safetensors"), metadata={"k": "v"})
    loaded = iio.load_safetensors(str(tmp_path / "w.safetensors"), "weights")
    assert torch.equal(loaded["w"], t["w"])
    assert sorted(os.listdir(tmp_path)) == ["t.txt", "w.safetensors"]


def test_checked_reads(tmp_path):
    with pytest.raises(CheckpointError, match="run metadata not found"):
        iio.read_json(str(tmp_path / "missing.json"), "run metadata")
    (tmp_path / "bad.json").write_text('{"a": ')
    with pytest.raises(CheckpointError, match="run metadata at .*bad.json is corrupt"):
        iio.read_json(str(tmp_path / "bad.json"), "run metadata")
    (tmp_path / "binary.json").write_bytes(b"\xff\xfe\x00garbage")  # not even UTF-8
    with pytest.raises(CheckpointError, match="run metadata at .*binary.json is corrupt"):
        iio.read_json(str(tmp_path / "binary.json"), "run metadata")
    (tmp_path / "bad.safetensors").write_bytes(b"\xff" * 40)
    with pytest.raises(CheckpointError, match="weights at .* is corrupt"):
        iio.load_safetensors(str(tmp_path / "bad.safetensors"), "weights")
    with pytest.raises(CheckpointError, match="weights not found"):
        iio.load_safetensors(str(tmp_path / "none.safetensors"), "weights")


def test_staged_directory_keeps_old_folder_when_body_raises(tmp_path):
    final = tmp_path / "run"
    final.mkdir()
    (final / "old.txt").write_text("previous result")
    with pytest.raises(KeyboardInterrupt):
        with iio.staged_directory(str(final)) as stage:
            assert os.path.isdir(stage) and os.path.abspath(stage) != os.path.abspath(final)
            with open(os.path.join(stage, "new.txt"), "w") as f:
                f.write("half of a new result")
            raise KeyboardInterrupt  # interrupted mid-run
    assert os.listdir(final) == ["old.txt"]
    assert (final / "old.txt").read_text() == "previous result"
    assert os.listdir(tmp_path) == ["run"]  # the partial stage was cleaned up


def test_staged_directory_failure_without_old_folder(tmp_path):
    with pytest.raises(ValueError):
        with iio.staged_directory(str(tmp_path / "run")) as stage:
            open(os.path.join(stage, "x"), "w").close()
            raise ValueError("bad")
    assert os.listdir(tmp_path) == []


def test_staged_directory_swaps_in_the_new_folder(tmp_path):
    final = tmp_path / "run"
    final.mkdir()
    (final / "old.txt").write_text("previous result")
    with iio.staged_directory(str(final)) as stage:
        assert not os.path.exists(os.path.join(stage, "old.txt"))  # built from scratch
        with open(os.path.join(stage, "new.txt"), "w") as f:
            f.write("new result")
        assert (final / "old.txt").exists()  # the old output stays until the swap
    assert os.listdir(final) == ["new.txt"]
    assert os.listdir(tmp_path) == ["run"]
    assert stat.S_IMODE(os.stat(final).st_mode) == 0o777 & ~_umask()
    with iio.staged_directory(str(tmp_path / "fresh")) as stage:
        open(os.path.join(stage, "a"), "w").close()
    assert os.listdir(tmp_path / "fresh") == ["a"]


@pytest.fixture(params=[0o022, 0o027], ids=["umask022", "umask027"])
def umask(request):
    """Run the test under this umask (a common default and a stricter one), then restore it."""
    with using_umask(request.param):
        yield request.param


def test_atomic_writers_give_files_the_umask_mode(tmp_path, umask):
    """safetensors writes a private 0600 file and renames it into place; what invdiff saves gets
    0666 less the umask, like the JSON beside it."""
    iio.atomic_save_file({"w": torch.zeros(2)}, str(tmp_path / "w.safetensors"))
    iio.atomic_write_json(str(tmp_path / "a.json"), {"x": 1})
    iio.atomic_write_text(str(tmp_path / "t.txt"), "x")
    assert file_modes(tmp_path) == {name: 0o666 & ~umask for name in ("w.safetensors", "a.json", "t.txt")}


def test_a_model_saved_in_a_staged_directory_gets_umask_modes(tmp_path, umask):
    from invdiff.models.conditioner import PromptEmbedding

    final = str(tmp_path / "model")
    with iio.staged_directory(final) as stage:
        PromptEmbedding(["a", "b"], embedding_dim=4).save_pretrained(os.path.join(stage, "conditioner"))
        iio.atomic_write_json(os.path.join(stage, "meta.json"), {})
    modes = file_modes(final)
    assert "conditioner/diffusion_pytorch_model.safetensors" in modes
    assert modes == umask_modes(final, umask)
    assert stat.S_IMODE(os.stat(final).st_mode) == 0o777 & ~umask
