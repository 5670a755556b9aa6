"""A Stable Diffusion run folder refers to its base (place + content hash) instead of copying it,
and `--copy-base` keeps the self-contained layout (issue 13). On the tiny SD folder (conftest)."""
import json
import os
import re
import shutil

import pytest
import torch

import invdiff.models.base_reference as base_reference
from invdiff.cli import build_parser, main
from invdiff.io import CheckpointError
from invdiff.models.base_reference import REFERENCE_KEY, check_local_base, describe_local_base, file_sha256
from invdiff.models.sd import SD_COMPONENTS, LatentDiffusionBase
from invdiff.pipeline import InvDiffPipeline
from invdiff.model_folders.load import load_model

# What a run folder that refers to its base holds: what the run made, nothing of the base.
RUN_FILES = [".invdiff-output.json", "README.md", "environments.safetensors", "guidance/config.json",
             "guidance/diffusion_pytorch_model.safetensors", "inspect/groups/a_blue_square-42f6a6ec59.png",
             "inspect/groups/a_red_square-659c55b258.png", "inspect/report.json", "inspect/report.md",
             "inspect/scores.png", "invdiff_run.json", "losses.safetensors", "train_log.json"]


@pytest.fixture(scope="module")
def runs(tiny_sd, tiny_sd_data, tmp_path_factory):
    """{"base", "ref", "copy"}: a private copy of the tiny SD base (tests move it and put it back),
    and two debias runs of it with the same settings and seed, without and with --copy-base."""
    root = tmp_path_factory.mktemp("base_reference")
    base = str(shutil.copytree(tiny_sd, root / "sd"))
    common = ["debias", "--base", base, "--data", tiny_sd_data, "--steps", "2", "--batch-size", "8",
              "--loss-timesteps", "2", "--loss-draws", "1"]
    assert main(common + ["--out", str(root / "ref")]) == 0
    assert main(common + ["--out", str(root / "copy"), "--copy-base"]) == 0
    return {"base": base, "ref": str(root / "ref"), "copy": str(root / "copy")}


def _files(folder):
    return sorted(os.path.relpath(os.path.join(r, n), folder).replace(os.sep, "/") for r, _, names in os.walk(folder) for n in names)


def _meta(run):
    with open(os.path.join(run, "invdiff_run.json")) as f:
        return json.load(f)


def _pipe_images(pipe):
    return pipe(["a red square", "a blue square"], num_inference_steps=3, guidance_scale=2.0, output_type="pt",
                generator=torch.Generator().manual_seed(5)).images


def _sample(model, out, *flags):
    return main(["sample", "--model", model, "--prompt", "a red square", "--prompt", "a blue square", "--num", "2",
                 "--steps", "3", "--seed", "11", "--out", out, *flags])


def _pngs(folder):
    return {name: open(os.path.join(folder, name), "rb").read() for name in _files(folder) if name.endswith(".png")}


def _one_error_line(capsys):
    lines = [line for line in re.split(r"[\r\n]", capsys.readouterr().err) if line.strip()]
    assert len(lines) == 1, lines
    return lines[0]


def test_an_sd_run_folder_holds_no_copy_of_its_base(runs):
    assert _files(runs["ref"]) == RUN_FILES
    base_hashes = {file_sha256(os.path.join(runs["base"], n)) for n in _files(runs["base"]) if n.endswith(".safetensors")}
    run_hashes = {file_sha256(os.path.join(runs["ref"], n)) for n in RUN_FILES}
    assert base_hashes and not base_hashes & run_hashes, "a base weights file is in the run folder under another name"
    reference = _meta(runs["ref"])[REFERENCE_KEY]
    assert reference["path"] == os.path.abspath(runs["base"])
    assert reference["sha256"] == describe_local_base(runs["base"])["sha256"]
    assert "unet/diffusion_pytorch_model.safetensors" in reference["files"]
    assert "invdiff_run.json" not in reference["files"] and not any(n.endswith(".bin") for n in reference["files"])
    # --copy-base: today's self-contained pipeline folder, which refers to nothing.
    copy_files = _files(runs["copy"])
    for part in ("unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
                 "text_encoder/model.safetensors", "tokenizer/vocab.json", "scheduler/scheduler_config.json", "model_index.json"):
        assert part in copy_files, part
    assert REFERENCE_KEY not in _meta(runs["copy"])
    with open(os.path.join(runs["copy"], "model_index.json")) as f:
        assert json.load(f)["guidance"] == ["invdiff", "GuidanceModule"]
    size = lambda run: sum(os.path.getsize(os.path.join(run, n)) for n in _files(run))  # noqa: E731
    weights = sum(os.path.getsize(os.path.join(runs["base"], n)) for n in _files(runs["base"]) if n.endswith(".safetensors"))
    assert size(runs["ref"]) + weights <= size(runs["copy"])
    # The model card says where the base is, and names the run folder, not the folder it was staged in.
    card = open(os.path.join(runs["ref"], "README.md")).read()
    assert repr(os.path.abspath(runs["base"])) in card and f'from_pretrained("{os.path.abspath(runs["ref"])}")' in card


def test_the_run_folder_samples_the_images_of_the_copy_base_run(runs, tmp_path):
    for name in ("guidance/config.json", "guidance/diffusion_pytorch_model.safetensors", "environments.safetensors"):
        assert file_sha256(os.path.join(runs["ref"], name)) == file_sha256(os.path.join(runs["copy"], name)), name
    assert _sample(runs["ref"], str(tmp_path / "ref")) == 0
    assert _sample(runs["copy"], str(tmp_path / "copy")) == 0
    ref, copy = _pngs(tmp_path / "ref"), _pngs(tmp_path / "copy")
    assert len(ref) == 4 and ref == copy
    torch.testing.assert_close(_pipe_images(InvDiffPipeline.from_pretrained(runs["ref"])),
                               _pipe_images(InvDiffPipeline.from_pretrained(runs["copy"])), atol=0, rtol=0)
    ref_base, ref_g = load_model(runs["ref"])
    assert ref_base.meta["source"] == os.path.abspath(runs["base"]) and ref_g is not None


def test_a_missing_base_is_one_clear_error_and_base_points_the_run_at_its_new_place(runs, tmp_path, capsys):
    base = runs["base"]
    moved = base + "_moved"
    expected = _pipe_images(InvDiffPipeline.from_pretrained(runs["copy"]))
    os.rename(base, moved)
    capsys.readouterr()
    try:
        assert _sample(runs["ref"], str(tmp_path / "s")) == 2
        line = _one_error_line(capsys)
        assert f"the base model {base!r}" in line and "does not exist" in line
        assert "--base DIR" in line and "--copy-base" in line
        assert not os.path.exists(tmp_path / "s")
        for load in (load_model, InvDiffPipeline.from_pretrained, LatentDiffusionBase.from_pretrained):
            with pytest.raises(CheckpointError, match="does not exist"):
                load(runs["ref"])
        # A move keeps the files' stamps: the new place is checked without reading the weights again.
        assert _sample(runs["ref"], str(tmp_path / "moved"), "--base", moved) == 0
        assert len(_pngs(tmp_path / "moved")) == 4
        with open(tmp_path / "moved" / "manifest.json") as f:
            assert json.load(f)["settings"]["base"] == moved
        torch.testing.assert_close(_pipe_images(InvDiffPipeline.from_pretrained(runs["ref"], base=moved)), expected,
                                   atol=0, rtol=0)
        assert load_model(runs["ref"], base=moved)[0].meta["source"] == moved
        capsys.readouterr()
        assert _sample(runs["ref"], str(tmp_path / "nowhere"), "--base", str(tmp_path / "nowhere_base")) == 2
        assert "--base" in _one_error_line(capsys)
    finally:
        os.rename(moved, base)


def _change(folder, how):
    weights = os.path.join(folder, "vae", "diffusion_pytorch_model.safetensors")
    if how == "differs":  # same size, one byte of the last tensor changed, a later modification time
        data = bytearray(open(weights, "rb").read())
        data[-1] ^= 0xFF
        stat = os.stat(weights)
        open(weights, "wb").write(bytes(data))
        os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # file times can be coarse
        return "vae/diffusion_pytorch_model.safetensors differs"
    if how == "is new":
        shutil.copy(weights, os.path.join(folder, "unet", "diffusion_pytorch_model.fp16.safetensors"))
        return "unet/diffusion_pytorch_model.fp16.safetensors is new"
    os.remove(os.path.join(folder, "tokenizer", "merges.txt"))
    return "tokenizer/merges.txt is missing"


@pytest.mark.parametrize("how", ["differs", "is new", "is missing"])
def test_a_changed_base_is_refused(runs, tmp_path, capsys, how):
    changed = str(shutil.copytree(runs["base"], tmp_path / "sd"))
    assert load_model(runs["ref"], base=changed)[1] is not None  # an unchanged copy loads
    what = _change(changed, how)
    capsys.readouterr()
    with pytest.raises(CheckpointError, match=f"has changed since run .* was made \\({re.escape(what)}\\)"):
        InvDiffPipeline.from_pretrained(runs["ref"], base=changed)
    assert _sample(runs["ref"], str(tmp_path / "s"), "--base", changed) == 2
    line = _one_error_line(capsys)
    assert f"the base model {changed!r} has changed since run" in line and what in line


def test_unchanged_stamps_spare_the_hash_and_other_stamps_are_hashed_again(runs, tmp_path, monkeypatch):
    reference = _meta(runs["ref"])[REFERENCE_KEY]
    hashed = []

    def counting(path):
        hashed.append(path)
        return file_sha256(path)

    monkeypatch.setattr(base_reference, "file_sha256", counting)
    check_local_base(runs["base"], reference, runs["ref"])
    assert hashed == []
    copied = str(shutil.copytree(runs["base"], tmp_path / "sd", copy_function=shutil.copyfile))  # new file times
    check_local_base(copied, reference, runs["ref"])
    assert len(hashed) == len(reference["files"])


def test_base_applies_only_to_a_run_that_refers_to_its_base(runs, tmp_path, capsys):
    capsys.readouterr()
    with pytest.raises(ValueError, match="no run folder that refers to its base"):
        load_model(runs["copy"], base=runs["base"])
    with pytest.raises(ValueError, match="no run folder that refers to its base"):
        InvDiffPipeline.from_pretrained(runs["copy"], base=runs["base"])
    assert _sample(runs["copy"], str(tmp_path / "s"), "--base", runs["base"]) == 2
    assert "refers to its base" in _one_error_line(capsys)


def test_a_damaged_reference_is_a_clear_error(runs, tmp_path):
    run = str(shutil.copytree(runs["ref"], tmp_path / "run"))
    meta = _meta(run)
    del meta[REFERENCE_KEY]["sha256"]
    with open(os.path.join(run, "invdiff_run.json"), "w") as f:
        json.dump(meta, f)
    with pytest.raises(CheckpointError, match="names none .* the run folder is damaged"):
        load_model(run)


def test_a_hub_id_base_is_referred_to_by_the_commit_it_was_loaded_at(tmp_path, monkeypatch):
    import huggingface_hub

    from invdiff.models.base_reference import describe_hub_base, resolve_base

    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = tmp_path / "models--org--name" / "snapshots" / commit
    for part in SD_COMPONENTS:
        (snapshot / part).mkdir(parents=True)
    cached = {"org/name": str(snapshot / "model_index.json")}
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache",
                        lambda repo_id, filename, revision=None: cached.get(repo_id))
    reference = describe_hub_base("org/name")
    assert reference == {"hub_id": "org/name", "revision": commit}
    assert describe_hub_base("org/not-cached") is None  # debias then copies the base instead
    run = tmp_path / "run"
    run.mkdir()
    (run / "invdiff_run.json").write_text(json.dumps({REFERENCE_KEY: reference}))
    # Loaded from its snapshot in the local hub cache, never downloaded (tests/test_offline.py).
    assert resolve_base(str(run)) == (str(snapshot), None)
    with pytest.raises(ValueError, match="base= does not apply"):
        resolve_base(str(run), base=str(tmp_path))


def test_the_flags_have_help():
    parsers = build_parser()._subparsers._group_actions[0].choices
    debias = " ".join(parsers["debias"].format_help().split())
    sample = " ".join(parsers["sample"].format_help().split())
    assert "--copy-base" in debias and "self-contained" in debias
    assert "--base BASE" in sample and "new place" in sample
