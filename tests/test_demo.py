"""`invdiff demo`: the report's schema, the targets logic, cached cells and bad requests."""
import json
import os

import pytest

from invdiff import demo
from invdiff.cli import main
from invdiff.io import CheckpointError


@pytest.fixture(scope="module")
def quick_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "out"
    rows = ["base", "erm", "oracle", "invdiff", "official", "jtt", "groupdro"]
    code = main(["demo", "--quick", "--out", str(out), "--seeds", "0", "1",
                 "--settings", "colors2_p0.9", "thickness_p0.9", "--rows", *rows])
    assert code == 0
    return out, json.load(open(out / "report.json")), rows


def test_quick_demo_report_schema(quick_report):
    out, report, rows = quick_report
    assert report["seeds"] == [0, 1] and report["rows"] == rows
    names = [s["name"] for s in report["settings"]]
    assert names == ["colors2_p0.9", "thickness_p0.9"]
    design = {s["name"]: s["design"] for s in report["settings"]}
    assert design == {"colors2_p0.9": True, "thickness_p0.9": False}
    for entry in report["settings"]:
        assert set(entry["models"]) == set(rows)
        for row, m in entry["models"].items():
            for key in ("bias", "digit_accuracy", "frechet_distance"):
                per_seed = m["per_seed"][key]
                assert len(per_seed) == 2
                assert m[key] == pytest.approx(sum(per_seed) / 2)
            assert 0.0 <= m["bias"] <= 1.0 and 0.0 <= m["digit_accuracy"] <= 1.0
            if row != "base":  # guided rows are swept over the strength
                assert [r["strength"] for r in m["sweep"]] == [0.5, 1.0]
        assert entry["targets"] == demo.setting_targets(entry["models"], entry["design"])
        assert os.path.isfile(out / f"pareto_{entry['name']}.png")
    assert report["settings"][0]["max_step_alignment"]  # the design setting's group diagnostic
    for name in ("report.md", "samples_base_vs_invdiff.png", "bias.png"):
        assert os.path.isfile(out / name)
    assert "held out" in open(out / "report.md").read()


def test_cached_cells_are_reused(quick_report, capsys):
    out, report, rows = quick_report
    cells = sorted(os.listdir(out / "cells"))
    assert len(cells) == 2 * 2 * len(rows) * 2  # settings x seeds x rows, .json + .safetensors
    assert main(["demo", "--quick", "--out", str(out), "--seeds", "0", "1", "--settings", "colors2_p0.9",
                 "thickness_p0.9", "--rows", *rows]) == 0
    assert "== " not in capsys.readouterr().out  # nothing was run again
    again = json.load(open(out / "report.json"))
    assert again["settings"] == report["settings"]


def test_cached_only_reports_what_is_there_and_runs_nothing(quick_report, capsys):
    out, report, rows = quick_report
    assert main(["demo", "--quick", "--out", str(out), "--seeds", "0", "1", "--settings", "colors2_p0.9",
                 "--rows", "base", "invdiff", "balanced", "--cached-only"]) == 0
    assert "== " not in capsys.readouterr().out
    partial = json.load(open(out / "report.json"))
    assert [s["name"] for s in partial["settings"]] == ["colors2_p0.9"]
    assert set(partial["settings"][0]["models"]) == {"base", "invdiff"}
    assert partial["not_run"] == ["colors2_p0.9 seed 0 balanced", "colors2_p0.9 seed 1 balanced"]
    assert partial["settings"][0]["models"]["invdiff"] == report["settings"][0]["models"]["invdiff"]
    assert "## Not run" in open(out / "report.md").read()


def _models(**bias):
    base = {"bias": 0.8, "digit_accuracy": 0.96, "frechet_distance": 200.0}
    models = {"base": base}
    for row, b in bias.items():
        models[row] = {"bias": b, "digit_accuracy": 0.95, "frechet_distance": 220.0}
    return models


def test_targets_logic():
    met = demo.setting_targets(_models(invdiff=0.35, oracle=0.30, erm=0.8), design=True)
    assert met == {"bias_at_most_0.5_of_base": True, "bias_within_0.08_of_oracle": True,
                   "frechet_at_most_1.15_of_base": True, "digit_accuracy_within_2_points": True,
                   "bias_not_worse_than_erm": True}
    missed = demo.setting_targets(_models(invdiff=0.45, oracle=0.30, erm=0.44), design=True)
    assert not missed["bias_at_most_0.5_of_base"] and not missed["bias_within_0.08_of_oracle"]
    assert not missed["bias_not_worse_than_erm"]
    # issue 21: the same targets on a held-out setting, with the seed spread and the groups' quality
    held_out = _models(invdiff=0.39)
    held_out["invdiff"].update(per_seed={"bias": [0.3, 0.39, 0.48]}, bias_seed_std=0.09,
                               balanced_minority_share=0.52, minority_recall=0.31)
    assert demo.setting_targets(held_out, design=False) == {
        "bias_at_most_0.5_of_base": True, "frechet_at_most_1.15_of_base": True, "digit_accuracy_within_2_points": True,
        "bias_seed_std_at_most_0.05": False, "balanced_minority_share_at_least_0.5": True,
        "minority_recall_at_least_0.5": False}
    assert not demo.setting_targets(_models(invdiff=0.41), design=False)["bias_at_most_0.5_of_base"]
    models = _models(invdiff=0.3)
    models["invdiff"].update(frechet_distance=231.0, digit_accuracy=0.939)
    worse = demo.setting_targets(models, design=False)
    assert not worse["frechet_at_most_1.15_of_base"] and not worse["digit_accuracy_within_2_points"]


@pytest.mark.parametrize("argv,message", [
    (["--settings", "colors9"], "unknown setting"),
    (["--rows", "base", "magic"], "unknown row"),
    (["--rows", "base", "erm"], "must include 'base' and 'invdiff'"),
    (["--seeds", "0", "0"], "distinct"),
])
def test_bad_requests_are_one_line_errors(tmp_path, capsys, argv, message):
    assert main(["demo", "--quick", "--out", str(tmp_path / "o"), *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
    assert not os.path.exists(tmp_path / "o")


def test_missing_shipped_base_names_make_assets(tmp_path, monkeypatch):
    monkeypatch.setattr(demo, "ASSETS", str(tmp_path))
    with pytest.raises(CheckpointError, match="make assets"):
        demo.check_request(["colors3_p0.9"], ["base", "invdiff"], [0])


def test_every_setting_ships_its_bases_as_the_manifest_records_them():
    """Each setting's base and balanced base are shipped, and their weights are the files that
    scripts/make_assets.py recorded (a rebuilt or forgotten base fails here, not mid-matrix)."""
    import hashlib
    import json

    with open(os.path.join(demo.ASSETS, "MANIFEST.json")) as f:
        manifest = json.load(f)
    for setting in demo.SETTINGS.values():
        for name in (setting.base, setting.balanced_base):
            recorded = manifest[name]["sha256"]
            assert recorded, name
            for rel, digest in recorded.items():
                with open(os.path.join(demo.ASSETS, rel), "rb") as f:
                    assert hashlib.sha256(f.read()).hexdigest() == digest, rel
