"""invdiff.sampling.job: bad prompts files, damaged job state and unknown prompts are clear errors
raised before any file is written or any image sampled; `load_samples` reads both manifest formats.
"""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from invdiff.sampling import job as sample_job
from invdiff.data.base import DataError
from invdiff.io import CheckpointError
from invdiff.models.conditioner import UnknownPromptError
from invdiff.outputs import MARKER, write_marker
from invdiff.sampling.job import LOG_DIR, MANIFEST, load_samples, prompt_dirname, read_prompts, run_sample_job

GOOD_LINE = '{"prompt": "digit 1"}'


def _write(path, text: str) -> str:
    path.write_text(text)
    return str(path)


def _run(model: str, prompts: str, out: str, **kw):
    """The job with the cheapest settings: one DDIM step per image, no progress bar."""
    return run_sample_job(model, prompts, out, steps=1, progress=False, **kw)


@pytest.fixture()
def no_model_loads(monkeypatch):
    """Fails the test if the job gets as far as loading the model (the start of all compute)."""
    def refuse(path):
        raise AssertionError(f"the model was loaded ({path}) before the bad input was refused")

    monkeypatch.setattr("invdiff.model_folders.load.load_model", refuse)


# ----------------------------------------------------------------------------- prompts files


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"prompt": "digit 1", "guidance_scale": null}', "'guidance_scale' must be a finite number"),
        ('{"prompt": "digit 1", "guidance_scale": "3"}', "'guidance_scale' must be a finite number"),
        ('{"prompt": "digit 1", "guidance_scale": NaN}', "'guidance_scale' must be a finite number"),
        ('{"prompt": "digit 1", "guidance_scale": 1e999}', "'guidance_scale' must be a finite number"),
        ('{"prompt": "digit 1", "guidance_scale": true}', "'guidance_scale' must be a finite number"),
        ('{"prompt": "digit 1", "seed": [1]}', "'seed' must be an integer"),
        ('{"prompt": "digit 1", "seed": "abc"}', "'seed' must be an integer"),
        ('{"prompt": "digit 1", "seed": null}', "'seed' must be an integer"),
        ('{"prompt": "digit 1", "seed": 1.5}', "'seed' must be an integer"),
        ('{"prompt": "digit 1", "seed": true}', "'seed' must be an integer"),
        ('{"prompt": "digit 1", "seed": -1}', "'seed' must be an integer"),
        # torch.Generator.manual_seed takes seeds below 2**64; the line's last image would need 2**64
        ('{"prompt": "digit 1", "seed": 18446744073709551615, "num": 2}', r"limit 2\*\*64 - 1"),
        ('{"prompt": "digit 1", "num": "3"}', "'num' must be an integer in \\[1, "),
        ('{"prompt": "digit 1", "num": 2.0}', "'num' must be an integer in \\[1, "),
        ('{"prompt": "digit 1", "num": true}', "'num' must be an integer in \\[1, "),
        ('{"prompt": "digit 1", "num": 0}', "'num' must be an integer in \\[1, "),
        ('{"prompt": ""}', "non-empty string 'prompt'"),
        ('{"prompt": 3}', "non-empty string 'prompt'"),
        ('{"num": 3}', "non-empty string 'prompt'"),
        ('["digit 1"]', "non-empty string 'prompt'"),
        ('{"prompt": "digit 1", "guidance": 3.0}', "unknown field"),  # a typo would silently sample at the default
        ('{"prompt": "digit 1"', "not valid JSON"),
    ],
)
def test_a_bad_prompts_line_names_the_file_and_line(tmp_path, line, message):
    path = _write(tmp_path / "prompts.jsonl", GOOD_LINE + "\n" + line + "\n")
    with pytest.raises(DataError, match=message) as info:
        read_prompts(path, num=1, seed=0, guidance_scale=1.0)
    assert f"{path}:2:" in str(info.value)


def test_a_running_seed_past_the_generator_range_is_refused(tmp_path):
    path = _write(tmp_path / "prompts.txt", "digit 1\ndigit 2\n")
    with pytest.raises(DataError, match=r"limit 2\*\*64 - 1") as info:
        read_prompts(path, num=1, seed=2**64 - 1, guidance_scale=1.0)
    assert f"{path}:2:" in str(info.value)


@pytest.mark.parametrize(
    "defaults, message",
    [
        (dict(num=0), "num must be an integer in \\[1, "),
        (dict(seed=-1), "seed must be an integer"),
        (dict(guidance_scale=float("nan")), "guidance_scale must be a finite number"),
        (dict(guidance_scale=float("inf")), "guidance_scale must be a finite number"),
    ],
)
def test_bad_defaults_are_refused(tmp_path, defaults, message):
    path = _write(tmp_path / "prompts.txt", "digit 1\n")
    with pytest.raises(ValueError, match=message):
        read_prompts(path, **{**dict(num=1, seed=0, guidance_scale=1.0), **defaults})


def test_good_lines_still_read(tmp_path):
    path = _write(tmp_path / "prompts.jsonl", "\n".join([
        '{"prompt": "digit 1", "num": 2, "seed": 100, "guidance_scale": 3}',
        '{"prompt": "digit 2"}',
        '{"prompt": "digit 1", "guidance_scale": 2.5}',
    ]) + "\n")
    items = read_prompts(path, num=1, seed=7, guidance_scale=1.0)
    assert [(it.prompt, it.seed, it.guidance_scale) for it in items] == [
        ("digit 1", 100, 3.0), ("digit 1", 101, 3.0), ("digit 2", 7, 1.0), ("digit 1", 8, 2.5)]
    one, two = prompt_dirname("digit 1"), prompt_dirname("digit 2")
    assert [it.path for it in items] == [
        os.path.join(one, "00000-seed100.png"), os.path.join(one, "00001-seed101.png"),
        os.path.join(two, "00000-seed7.png"), os.path.join(one, "00002-seed8.png")]
    assert all(isinstance(it.guidance_scale, float) for it in items)


def test_a_bad_prompts_file_costs_no_compute_and_writes_nothing(tmp_path, no_model_loads):
    prompts = _write(tmp_path / "prompts.jsonl", GOOD_LINE + '\n{"prompt": "digit 2", "seed": "abc"}\n')
    out = tmp_path / "out"
    with pytest.raises(DataError, match="prompts.jsonl:2:"):
        _run("no-model-needed", prompts, str(out))
    assert not out.exists()


# ----------------------------------------------------------------------------- job state


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"settings": {"model": "x"', "is corrupt"),  # cut short by a crash or a full disk
        ('[1, 2, 3]', "expected a JSON object"),
        ('{"items": 3}', "expected a JSON object"),  # no settings to compare with
    ],
)
def test_a_damaged_job_file_is_a_clear_error(tmp_path, no_model_loads, content, message):
    prompts = _write(tmp_path / "prompts.txt", "digit 1\n")
    out = tmp_path / "out"
    out.mkdir()
    write_marker(str(out), "sample-job", ["job.json"])  # the job's own folder: only its job file is damaged
    job = out / "job.json"
    job.write_text(content)
    with pytest.raises(CheckpointError, match=message) as info:
        _run("no-model-needed", prompts, str(out), resume=True)
    assert str(job) in str(info.value)
    assert job.read_text() == content and sorted(os.listdir(out)) == [MARKER, "job.json"]


@pytest.fixture()
def finished_job(tmp_path, tiny_base_dir):
    """A finished 3-image job on the tiny base: (prompts file, output folder, manifest lines)."""
    prompts = _write(tmp_path / "prompts.txt", "digit 1\ndigit 2\ndigit 3\n")
    out = str(tmp_path / "job")
    _run(tiny_base_dir, prompts, out)
    with open(os.path.join(out, MANIFEST)) as f:
        return prompts, out, f.read().splitlines()


def _log(out: str) -> str:
    return os.path.join(out, LOG_DIR, "rank-00000.jsonl")


@pytest.mark.parametrize(
    "bad_line, message",
    [
        ('{"prompt": "digit 2", "path": "digit_2/00000-seed1.png"}', "integer 'item'"),
        ('{"item": "1", "path": "digit_2/00000-seed1.png"}', "integer 'item'"),
        ('{"item": 1}', "string 'path'"),
        ('[1]', "integer 'item'"),
        ('{"item": 1, "pa', "not valid JSON"),  # a torn line that is not the last one
    ],
)
def test_a_malformed_log_line_names_the_file_and_line(finished_job, tiny_base_dir, no_model_loads, bad_line, message):
    prompts, out, _ = finished_job
    with open(_log(out)) as f:
        lines = f.read().splitlines()
    lines[1] = bad_line
    with open(_log(out), "w") as f:
        f.write("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=message) as info:
        _run(tiny_base_dir, prompts, out, resume=True)
    assert f"{_log(out)}:2:" in str(info.value)


def test_a_torn_last_log_line_is_resampled_and_resuming_appends_cleanly(finished_job, tiny_base_dir):
    # A kill while a record is written leaves the log's last line without its newline. That item
    # is sampled again, and its new record must not be glued onto the fragment (it was, and was
    # lost with it: the job then ended with "1 item(s) have no image").
    prompts, out, manifest = finished_job
    with open(_log(out)) as f:
        lines = f.read().splitlines()
    with open(_log(out), "w") as f:
        f.write(lines[0] + "\n" + lines[1][: len(lines[1]) // 2])  # item 1 torn, item 2 never written
    assert sorted(sample_job.completed(out, read_prompts(prompts, 1, 0, 1.0))) == [0]
    summary = _run(tiny_base_dir, prompts, out, resume=True)
    assert (summary["resumed"], summary["sampled_here"]) == (1, 2)
    with open(os.path.join(out, MANIFEST)) as f:
        assert f.read().splitlines() == manifest
    with open(_log(out)) as f:
        assert [json.loads(line)["item"] for line in f] == [0, 1, 2]


def test_an_unknown_prompt_leaves_nothing_behind(tmp_path, tiny_base_dir, monkeypatch):
    import invdiff.sampling.engine

    def no_sampling(*args, **kwargs):
        raise AssertionError("sampled before every prompt was checked")

    monkeypatch.setattr(invdiff.sampling.engine.SamplingEngine, "step", no_sampling)
    prompts = _write(tmp_path / "prompts.txt", "digit 1\ndigit 42\n")
    out = tmp_path / "out"
    with pytest.raises(UnknownPromptError, match="digit 42"):
        _run(tiny_base_dir, prompts, str(out))
    assert not out.exists()
    out.mkdir()  # an empty folder given as --out stays empty
    with pytest.raises(UnknownPromptError, match="digit 42"):
        _run(tiny_base_dir, prompts, str(out))
    assert os.listdir(out) == []


def test_bad_engine_settings_leave_nothing_behind(tmp_path, tiny_base_dir):
    prompts = _write(tmp_path / "prompts.txt", "digit 1\n")
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="max_batch must be >= 1"):
        _run(tiny_base_dir, prompts, str(out), batch_size=0)
    with pytest.raises(ValueError, match="steps must be >= 1"):
        run_sample_job(tiny_base_dir, prompts, str(out), steps=0, progress=False)
    assert not out.exists()


# ----------------------------------------------------------------------------- load_samples


def _write_png(path, pixels: np.ndarray) -> None:
    from PIL import Image

    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(pixels).save(path)


def _pixels(n: int, size: int = 4, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def _plain_sample_folder(root, entries, pixels) -> str:
    """The layout of `invdiff sample --prompt`: manifest.json plus the PNGs."""
    for e, p in zip(entries, pixels):
        _write_png(os.path.join(root, e["path"]), p)
    with open(os.path.join(root, "manifest.json"), "w") as f:
        json.dump({"settings": {"steps": 1}, "images": entries}, f)
    return str(root)


def test_load_samples_reads_a_plain_sample_folder(tmp_path):
    pixels = _pixels(3)
    entries = [{"prompt": "digit 3", "seed": i, "path": os.path.join("digit_3", f"{i:04d}.png")} for i in range(2)]
    entries.append({"prompt": "digit 4", "seed": 2, "path": os.path.join("digit_4", "0000.png")})
    images, prompts = load_samples(_plain_sample_folder(tmp_path, entries, pixels))
    assert prompts == ["digit 3", "digit 3", "digit 4"]
    assert images.dtype == torch.float32 and images.shape == (3, 3, 4, 4)
    expected = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    assert torch.equal(images, expected)


def test_load_samples_reads_a_finished_job(finished_job):
    _, out, manifest = finished_job
    images, prompts = load_samples(out)
    assert prompts == ["digit 1", "digit 2", "digit 3"]
    assert images.shape == (3, 3, 16, 16) and images.min() >= -1 and images.max() <= 1
    from PIL import Image

    with Image.open(os.path.join(out, json.loads(manifest[1])["path"])) as im:
        second = torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1).float() / 127.5 - 1.0
    assert torch.equal(images[1], second)


def test_load_samples_of_an_unfinished_job_says_to_resume(finished_job):
    _, out, _ = finished_job
    os.remove(os.path.join(out, MANIFEST))
    with pytest.raises(DataError, match="not found.*--resume"):
        load_samples(out)


@pytest.mark.parametrize("make", ["missing folder", "empty folder"])
def test_load_samples_without_a_manifest_is_not_found(tmp_path, make):
    folder = tmp_path / "samples"
    if make == "empty folder":
        folder.mkdir()
    with pytest.raises(DataError, match="not found") as info:
        load_samples(str(folder))
    assert str(folder) in str(info.value)


def test_load_samples_refuses_two_manifests(tmp_path):
    folder = _plain_sample_folder(tmp_path, [{"prompt": "a", "seed": 0, "path": "a.png"}], _pixels(1))
    (tmp_path / MANIFEST).write_text(json.dumps({"prompt": "a", "path": "a.png"}) + "\n")
    with pytest.raises(DataError, match="both"):
        load_samples(folder)


@pytest.mark.parametrize(
    "path_of, message",
    [
        (lambda root: "../outside.png", "outside"),
        (lambda root: str(root.parent / "outside.png"), "outside"),  # absolute
        (lambda root: "escape/outside.png", "outside"),  # through a link out of the folder
        (lambda root: "digit_1/gone.png", "missing"),
        (lambda root: "not_an_image.png", "not a readable image"),
    ],
)
@pytest.mark.parametrize("manifest_format", ["json", "jsonl"])
def test_load_samples_refuses_bad_entries(tmp_path, path_of, message, manifest_format):
    root = tmp_path / "samples"
    _write_png(str(tmp_path / "outside.png"), _pixels(1)[0])
    _write_png(str(root / "digit_1" / "0000.png"), _pixels(1)[0])
    (root / "not_an_image.png").write_bytes(b"no PNG here")
    os.symlink(str(tmp_path), str(root / "escape"))
    entries = [{"prompt": "digit 1", "seed": 0, "path": os.path.join("digit_1", "0000.png")},
               {"prompt": "digit 1", "seed": 1, "path": path_of(root)}]
    if manifest_format == "json":
        manifest, where = root / "manifest.json", "images[1]"
        manifest.write_text(json.dumps({"settings": {}, "images": entries}))
    else:
        manifest, where = root / MANIFEST, ":2:"
        manifest.write_text("".join(json.dumps(e) + "\n" for e in entries))
    with pytest.raises(DataError, match=message) as info:
        load_samples(str(root))
    assert str(manifest) in str(info.value) and where in str(info.value)


@pytest.mark.parametrize(
    "manifest_name, content, message",
    [
        ("manifest.json", '{"images": [', "is corrupt"),
        ("manifest.json", '[]', "expected an object with an 'images' list"),
        ("manifest.json", '{"images": []}', "lists no images"),
        ("manifest.json", '{"images": [{"path": "a.png"}]}', "string 'prompt'"),
        ("manifest.json", '{"images": [{"prompt": "a", "path": 3}]}', "string 'path'"),
        (MANIFEST, '{"prompt": "a", "path": "a.png"}\n{"prompt": "a", "pa\n', ":2: not valid JSON"),
        (MANIFEST, '\n', "lists no images"),
    ],
)
def test_load_samples_refuses_malformed_manifests(tmp_path, manifest_name, content, message):
    _write_png(str(tmp_path / "a.png"), _pixels(1)[0])
    (tmp_path / manifest_name).write_text(content)
    with pytest.raises((DataError, CheckpointError), match=message) as info:
        load_samples(str(tmp_path))
    assert str(tmp_path / manifest_name) in str(info.value)


def test_load_samples_refuses_mixed_sizes(tmp_path):
    _write_png(str(tmp_path / "a.png"), _pixels(1, size=4)[0])
    _write_png(str(tmp_path / "b.png"), _pixels(1, size=6)[0])
    (tmp_path / "manifest.json").write_text(json.dumps({"images": [{"prompt": "x", "path": "a.png"},
                                                                   {"prompt": "x", "path": "b.png"}]}))
    with pytest.raises(DataError, match="sizes differ"):
        load_samples(str(tmp_path))


def test_resume_with_overwrite_and_other_settings_samples_everything_again(finished_job, tiny_base_dir):
    """--resume keeps the finished images of this very job only: once --overwrite replaces a job
    made with other settings (here 2 steps instead of 1), none of its images may be kept."""
    prompts, out, _ = finished_job
    summary = run_sample_job(tiny_base_dir, prompts, out, steps=2, progress=False, resume=True, overwrite=True)
    assert summary["resumed"] == 0 and summary["sampled_here"] == 3
    with open(_log(out)) as f:
        assert len(f.read().splitlines()) == 3  # the old job's records are gone
    # The same settings again: --resume keeps all three.
    again = run_sample_job(tiny_base_dir, prompts, out, steps=2, progress=False, resume=True, overwrite=True)
    assert again["resumed"] == 3
