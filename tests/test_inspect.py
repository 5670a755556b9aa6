"""`invdiff inspect` and the inspect/ report of every debias run folder (issue 26): the grids hold
the images of the groups the max step found (checked pixel by pixel against the training images),
the summary is the run folder's groups, a planted minority shows up by its file names, a latent
base's grids show the training files (never latents), and bad input is one line, exit 2, before
any compute. Timing is in benchmarks/bench_inspect.py, not here."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from invdiff.cli import main
from invdiff.data import colored_digits
from invdiff.environments import load_environments
from invdiff.inspection import GRID_IMAGES, INSPECT_DIR, sample_groups, tile_box
from invdiff.outputs import MARKER, read_marker
from invdiff.report import to_uint8

BASE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "invdiff", "assets", "base_p0.9")
# Two timesteps keep the max step at ~3k evaluations of the shipped base over all 1438 images.
FAST = ["--loss-timesteps", "2"]


def _report(folder):
    with open(os.path.join(folder, "report.json")) as f:
        return json.load(f)


def _grid_tiles(folder, row, block, count):
    """The `count` tiles of `block` (0: high group, 1: rest) of a report row's grid, (count, s, s, 3)."""
    grid = np.array(Image.open(os.path.join(folder, row["grid"])).convert("RGB"))
    side = _report(folder)["tile_side"]
    tiles = []
    for index in range(count):
        top, left = tile_box(block, index, side)
        tiles.append(grid[top:top + side, left:left + side])
    return np.stack(tiles) if tiles else np.zeros((0, side, side, 3), np.uint8)


def assert_grid_shows(folder, row, images_by_part):
    """The grid's tiles are the given images, in order, each pixel repeated to the tile's size.
    images_by_part: {"high": (M, H, W, 3) uint8, "rest": ...}."""
    for block, part in enumerate(("high", "rest")):
        expected = images_by_part[part]
        tiles = _grid_tiles(folder, row, block, len(expected))
        assert len(expected) == len(row["shown"][part])
        if not len(expected):
            continue
        step = tiles.shape[1] // expected.shape[1]
        assert step >= 1 and tiles.shape[1] == step * expected.shape[1]
        assert np.array_equal(tiles[:, ::step, ::step], expected), (row["prompt"], part)
        # every pixel of a tile is one pixel of its image: the tile is the image, not a blur of it
        assert np.array_equal(tiles, expected.repeat(step, 1).repeat(step, 2))


# ----------------------------------------------------------------------------- the embedded benchmark


@pytest.fixture(scope="module")
def embedded_run(tmp_path_factory):
    """A debias run of the shipped p=0.9 base on the colored digits (2 loss timesteps, 2 min steps)."""
    run = str(tmp_path_factory.mktemp("inspect") / "run")
    assert main(["debias", "--base", BASE, *FAST, "--steps", "2", "--batch-size", "16", "--no-calibrate",
                 "--out", run]) == 0
    return run


@pytest.fixture(scope="module")
def digits():
    return colored_digits("train", p=0.9)


def _run_groups(run):
    """{prompt id: (ids of the high group, ids of the rest, sizes low to high)} from the run's own files."""
    env = load_environments(os.path.join(run, "environments.safetensors"))
    with open(os.path.join(run, "invdiff_run.json")) as f:
        k = json.load(f)["config"]["groups"]
    ds = colored_digits("train", p=0.9)
    prompt_of = dict(zip(ds.sample_ids.tolist(), ds.prompt_ids.tolist()))
    prompt_ids = torch.tensor([prompt_of[int(s)] for s in env["sample_ids"].tolist()])
    groups = sample_groups(env["weights"], k)
    found = {}
    for p in prompt_ids.unique().tolist():
        mine = prompt_ids == p
        order = sorted(range(k), key=lambda g: float(env["scores"][mine & (groups == g)].mean()))
        ids = env["sample_ids"]
        found[p] = ({int(s) for s in ids[mine & (groups == order[-1])]}, {int(s) for s in ids[mine & (groups != order[-1])]},
                    [int((mine & (groups == g)).sum()) for g in order])
    return found, env


def _digit_images(ds, sample_ids):
    row = {int(s): i for i, s in enumerate(ds.sample_ids.tolist())}
    return to_uint8(ds.images[[row[s] for s in sample_ids]]).numpy()


def test_a_debias_run_folder_holds_the_report_of_its_groups(embedded_run, digits):
    folder = os.path.join(embedded_run, INSPECT_DIR)
    report = _report(folder)
    assert "inspect" in read_marker(embedded_run)["entries"]
    found, env = _run_groups(embedded_run)
    stability = json.loads(_metadata(embedded_run)["invdiff"])["cut_stability"]
    assert [row["prompt"] for row in report["prompts"]] == [f"digit {d}" for d in range(10)]
    for row in report["prompts"]:
        high, rest, sizes = found[row["id"]]
        # the summary is the run's groups
        assert row["group_sizes"] == sizes and row["high_group_size"] == len(high)
        assert row["smaller_share"] == pytest.approx(min(sizes) / sum(sizes))
        assert row["stability"] == pytest.approx(stability[str(row["id"])])
        # the grid shows the high group's images beside a draw of the rest, at most GRID_IMAGES each
        assert set(row["shown"]["high"]) <= high and len(row["shown"]["high"]) == min(GRID_IMAGES, len(high))
        assert set(row["shown"]["rest"]) <= rest and len(row["shown"]["rest"]) == min(GRID_IMAGES, len(rest))
        assert_grid_shows(folder, row, {part: _digit_images(digits, row["shown"][part]) for part in ("high", "rest")})
        assert f"| {row['prompt']} | {row['samples']} | {' / '.join(map(str, sizes))} |" in _text(folder, "report.md")
    assert os.path.isfile(os.path.join(folder, "scores.png"))


def _metadata(run):
    from safetensors import safe_open

    with safe_open(os.path.join(run, "environments.safetensors"), "pt") as f:
        return f.metadata()


def _text(folder, name):
    with open(os.path.join(folder, name)) as f:
        return f.read()


def test_inspect_run_reports_the_run_folders_groups(embedded_run, tmp_path, capsys):
    out = str(tmp_path / "report")
    assert main(["inspect", "--run", embedded_run, "--out", out]) == 0
    assert "report.md" in capsys.readouterr().out
    mine, theirs = _report(out), _report(os.path.join(embedded_run, INSPECT_DIR))
    assert mine["prompts"] == theirs["prompts"]
    assert read_marker(out)["kind"] == "inspect"
    for row in mine["prompts"]:
        assert open(os.path.join(out, row["grid"]), "rb").read() == open(
            os.path.join(embedded_run, INSPECT_DIR, row["grid"]), "rb").read()
    # run again into its own report: replaced, nothing else asked
    assert main(["inspect", "--run", embedded_run, "--out", out, "--prompts", "digit 4"]) == 0
    assert [row["prompt"] for row in _report(out)["prompts"]] == ["digit 4"]
    assert sorted(os.listdir(os.path.join(out, "groups"))) == [os.path.basename(mine["prompts"][4]["grid"])]


def test_inspect_base_finds_the_groups_debias_trains_on(embedded_run, digits, tmp_path):
    """The max step alone, before any debias: the same groups as the run with the same max-step
    settings, for the prompts asked for only."""
    out = str(tmp_path / "before")
    assert main(["inspect", "--base", BASE, *FAST, "--prompts", "digit 7", "digit 0", "--out", out]) == 0
    report = _report(out)
    found, _ = _run_groups(embedded_run)
    assert [row["prompt"] for row in report["prompts"]] == ["digit 7", "digit 0"]
    assert sorted(os.listdir(os.path.join(out, "groups"))) == sorted(os.path.basename(r["grid"]) for r in report["prompts"])
    for row in report["prompts"]:
        high, rest, sizes = found[row["id"]]
        assert row["group_sizes"] == sizes and set(row["shown"]["high"]) <= high and set(row["shown"]["rest"]) <= rest
        assert_grid_shows(out, row, {part: _digit_images(digits, row["shown"][part]) for part in ("high", "rest")})
    assert report["source"]["base"] == os.path.abspath(BASE) and report["max_step"]["loss_timesteps"] == 2


def test_a_run_whose_data_cannot_be_loaded_again_says_how_to_make_its_report(embedded_run, tmp_path):
    """A run made in Python on a dataset its record cannot name (the demo's held-out settings)."""
    from invdiff.inspection import write_run_inspection
    from invdiff.io import load_safetensors

    with open(os.path.join(embedded_run, "invdiff_run.json")) as f:
        meta = {**json.load(f), "data": {"name": "made in Python"}}
    env = load_environments(os.path.join(embedded_run, "environments.safetensors"))
    losses = load_safetensors(os.path.join(embedded_run, "losses.safetensors"), "losses")["losses"]
    result = {"weights": env["weights"], "scores": env["scores"], "losses": losses, "meta": meta}
    assert write_run_inspection(str(tmp_path / INSPECT_DIR), result, env["sample_ids"]) is None
    assert os.listdir(tmp_path / INSPECT_DIR) == ["report.md"]
    assert "invdiff inspect --run RUN --data DATA" in _text(tmp_path / INSPECT_DIR, "report.md")
    # given groups (the oracle's, ERM's) have nothing inferred to show
    assert write_run_inspection(str(tmp_path / "given"), {**result, "meta": {**meta, "given_weights": True}},
                                env["sample_ids"]) is None
    assert not os.path.exists(tmp_path / "given")


# ----------------------------------------------------------------------------- a planted minority


def _planted_folder(root):
    """Two prompts of 40 images of 16 x 16: red shapes, except 4 per prompt (files planted_*) in green."""
    rng = np.random.default_rng(0)
    os.makedirs(root)
    rows = []
    yy, xx = np.mgrid[:16, :16]
    for prompt in ("a square", "a disc"):
        mask = (abs(yy - 7.5) < 5) & (abs(xx - 7.5) < 5) if prompt == "a square" else (yy - 7.5) ** 2 + (xx - 7.5) ** 2 < 25
        for i in range(40):
            planted = i % 10 == 3
            arr = np.full((16, 16, 3), 20, np.int64)
            arr[mask] = (40, 220, 40) if planted else (220, 40, 40)
            arr = np.clip(arr + rng.integers(-12, 12, arr.shape), 0, 255).astype(np.uint8)
            name = f"{'planted' if planted else 'plain'}_{prompt.split()[1]}_{i:02d}.png"
            Image.fromarray(arr).save(os.path.join(root, name))
            rows.append({"file_name": name, "text": prompt})
    with open(os.path.join(root, "metadata.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return root


def _files(root, names):
    return np.stack([np.array(Image.open(os.path.join(root, n)).convert("RGB")) for n in names])


def test_the_high_loss_group_of_a_planted_minority_shows_its_files(tmp_path):
    """A base trained on the folder learns the red majority; the frozen loss is highest on the
    green files, and the grid's left block is exactly them."""
    from invdiff.data import load_dataset
    from invdiff.training import BaseTrainConfig, train_base

    data = _planted_folder(str(tmp_path / "data"))
    base = train_base(load_dataset(data), BaseTrainConfig(steps=100, batch_size=16, widths=(8, 16), embedding_dim=32),
                      progress=False)
    base.save_pretrained(str(tmp_path / "base"))
    out = str(tmp_path / "report")
    assert main(["inspect", "--base", str(tmp_path / "base"), "--data", data, "--out", out]) == 0
    report = _report(out)
    assert {row["prompt"] for row in report["prompts"]} == {"a square", "a disc"}
    for row in report["prompts"]:
        shape = row["prompt"].split()[1]
        assert sorted(row["files"]["high"]) == [f"planted_{shape}_{i:02d}.png" for i in (3, 13, 23, 33)]
        assert all(n.startswith(f"plain_{shape}_") for n in row["files"]["rest"])
        assert row["group_sizes"] == [36, 4] and not row["warnings"]
        assert_grid_shows(out, row, {part: _files(data, row["files"][part]) for part in ("high", "rest")})
        assert "`planted_" in _text(out, "report.md")


def test_a_latent_base_shows_the_training_files_not_latents(tiny_sd, tiny_sd_data, tmp_path):
    out = str(tmp_path / "report")
    assert main(["inspect", "--base", tiny_sd, "--data", tiny_sd_data, *FAST, "--out", out]) == 0
    report = _report(out)
    assert report["pooled"]  # 8 images a prompt: too few for groups within each
    with open(os.path.join(tiny_sd_data, "metadata.jsonl")) as f:
        prompt_of = {r["file_name"]: r["text"] for r in map(json.loads, f)}
    for row in report["prompts"]:
        names = row["files"]["high"] + row["files"]["rest"]
        assert len(names) == row["samples"] == 8 and {prompt_of[n] for n in names} == {row["prompt"]}
        assert_grid_shows(out, row, {part: _files(tiny_sd_data, row["files"][part]) for part in ("high", "rest")})


# ----------------------------------------------------------------------------- bad input


@pytest.fixture
def no_compute(monkeypatch):
    """The max step, the base's load and the report's statistics raise if anything reaches them."""
    import invdiff.inspection
    import invdiff.model_folders.load

    def forbidden(*args, **kwargs):
        raise AssertionError("compute started before the input was checked")

    for name in ("collect_losses", "cut_stability", "readout_reference", "groups_from_losses"):
        monkeypatch.setattr(invdiff.inspection, name, forbidden)
    monkeypatch.setattr(invdiff.model_folders.load, "load_base", forbidden)


def _one_line(capsys, *fragments):
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("invdiff "), err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def test_a_run_folder_without_saved_losses_says_what_writes_them(embedded_run, tmp_path, no_compute, capsys):
    import shutil

    run = shutil.copytree(embedded_run, tmp_path / "old_run")
    os.remove(run / "losses.safetensors")
    assert main(["inspect", "--run", str(run), "--out", str(tmp_path / "o")]) == 2
    _one_line(capsys, "no losses.safetensors", "every `invdiff debias`", "0.1.0", "--base BASE --data DATA")
    assert main(["inspect", "--run", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    _one_line(capsys, "does not exist")
    assert main(["inspect", "--run", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    _one_line(capsys, "no invdiff_run.json", "not a debias run folder")
    assert not os.path.exists(tmp_path / "o")


@pytest.mark.parametrize("argv, fragments", [
    (["inspect", "--out", "{tmp}/o"], ["one of the arguments --base --run is required"]),
    (["inspect", "--base", "{base}", "--run", "{run}", "--out", "{tmp}/o"], ["not allowed with argument"]),
    (["inspect", "--base", "{tmp}/missing", "--out", "{tmp}/o"], ["--base", "does not exist"]),
    (["inspect", "--run", "{run}", "--groups", "3", "--out", "{tmp}/o"], ["--groups applies to --base"]),
    (["inspect", "--base", "{base}", "--prompts", "digit 1", "digit 12", "--out", "{tmp}/o"],
     ["'digit 12' is not a prompt of the data", "'digit 0'", "'digit 9'"]),
    (["inspect", "--run", "{run}", "--prompts", "a cat", "--out", "{tmp}/o"], ["'a cat' is not a prompt", "'digit 3'"]),
    (["inspect", "--base", "{base}", "--loss-timesteps", "0", "--out", "{tmp}/o"], ["must be >= 1"]),
])
def test_bad_input_is_one_line_before_compute(embedded_run, tmp_path, no_compute, capsys, argv, fragments):
    argv = [a.format(base=BASE, run=embedded_run, tmp=tmp_path) for a in argv]
    assert main(argv) == 2
    _one_line(capsys, *fragments)
    assert not os.path.exists(tmp_path / "o")


def test_an_out_holding_other_files_is_refused(tmp_path, no_compute, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("a year of work")
    assert main(["inspect", "--base", BASE, "--out", str(mine)]) == 2
    _one_line(capsys, "not made by invdiff", "never replaces it")
    assert os.listdir(mine) == ["notes.txt"] and (mine / "notes.txt").read_text() == "a year of work"
    # nor is another kind of invdiff output replaced by a report
    (mine / "notes.txt").unlink()
    (mine / MARKER).write_text(json.dumps({"made_by": "invdiff", "kind": "samples", "entries": []}))
    assert main(["inspect", "--base", BASE, "--out", str(mine)]) == 2
    _one_line(capsys, "holds samples", "not an inspect report")
