"""`invdiff demo`: debias shipped biased models and prove it, against baselines, on the setting the
defaults were chosen on and on settings no choice was made on.

A *setting* is a biased training set plus the shipped base model trained on it (SETTINGS). A
*row* is one model evaluated on it (ROWS): the frozen base; ERM (the same G_psi on the plain
mean loss); the oracle (InvDiff given the true (prompt, attribute) groups, a ceiling no real user
has); InvDiff (inferred groups, no labels); the official recipe as published; JTT- and GroupDRO-
style baselines on the inferred groups; and a base trained on balanced data (the quality a
perfectly debiased model could have). Guided rows are swept over the sampling strength s.

Every (setting, seed, row) cell is cached as JSON under OUT/cells, keyed by the settings it was
made with, so an interrupted `--full` run continues where it stopped. Attribute labels are read
for evaluation, the oracle and the alignment diagnostic only.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from typing import Dict, List, Optional, Sequence

import torch
from safetensors.torch import load_file, save_file

from .data.colored_digits import COLOR_NAMES, colored_digits, majority_color
from .data.layout_digits import LAYOUT_ATTRIBUTES
from .data.stroke_digits import THICKNESS_NAMES
from .environments import band_start_of, collect_losses, weights_from_losses
from .io import CheckpointError, atomic_path, atomic_write_json
from .outputs import check_output_folder, write_marker
from .metrics import evaluate_samples, group_alignment, load_digit_classifier, predict_color
from .models.base import FrozenBase
from .report import bias_bar_chart, pareto_chart, sample_grid, write_markdown
from .config import DebiasConfig, recipe_config
from .debiasing import debias
from .model_folders.load import load_model
from .sampling import GuidedDenoiser, sample

ASSETS = os.path.join(os.path.dirname(__file__), "assets")
DEMO_P = 0.9


@dataclass(frozen=True)
class Setting:
    """A biased training set and the shipped base trained on it."""

    key: str
    title: str
    design: bool  # the defaults were chosen here; every other setting is held out
    base: str  # shipped asset folder name
    attribute: str  # "color", "thickness", "position" or "size"
    p: float  # majority share of each prompt's majority attribute value
    num_values: int  # values the attribute takes
    balanced_base: str  # the same budget on balanced data (p = 1 / num_values)


SETTINGS = {
    s.key: s
    for s in (
        Setting("colors2_p0.9", "colored digits, 2 colours, p = 0.9", True, "base_p0.9", "color", 0.9, 2, "base_balanced"),
        Setting("colors2_p0.8", "colored digits, 2 colours, p = 0.8", False, "base_p0.8", "color", 0.8, 2, "base_balanced"),
        Setting("colors3_p0.9", "colored digits, 3 colours, p = 0.9", False, "base_p0.9_c3", "color", 0.9, 3,
                "base_balanced_c3"),
        Setting("thickness_p0.9", "stroke thickness (white digits, imagefolder), p = 0.9", False, "base_thick_p0.9",
                "thickness", 0.9, 2, "base_thick_balanced"),
        # Issue 21's own held-out settings (invdiff/data/layout_digits.py): not a stroke property at all.
        Setting("position_p0.9", "digit position, left or right (white digits, imagefolder), p = 0.9", False,
                "base_position_p0.9", "position", 0.9, 2, "base_position_balanced"),
        Setting("size_p0.9", "digit size, small or large (white digits, imagefolder), p = 0.9", False,
                "base_size_p0.9", "size", 0.9, 2, "base_size_balanced"),
    )
}
DESIGN = "colors2_p0.9"
ROWS = ("base", "erm", "oracle", "invdiff", "official", "jtt", "groupdro", "balanced")
MAIN_ROWS = ("base", "erm", "oracle", "invdiff", "official")


def shipped_base(p: float = DEMO_P, name: Optional[str] = None) -> str:
    """The folder of a shipped base model (by name, or the 2-colour base at p)."""
    name = name or f"base_p{p:g}"
    path = os.path.join(ASSETS, name)
    if not os.path.isdir(path):
        raise CheckpointError(f"no shipped base model {name!r}: run `make assets` to rebuild {path}")
    return path


def demo_settings(quick: bool = False, full: bool = False) -> Dict:
    """The demo's fixed settings. `quick` shrinks everything for the CI smoke test."""
    s = {
        "invdiff": DebiasConfig(),
        "per_digit": 40,
        "sample_steps": 25,
        # w = 1: CFG at w = 2 on top of G moved Bias back towards the base's
        # (docs/research_notes.md, "What we found" 8).
        "guidance_scale": 1.0,
        "sweep": [0.5, 1.0, 1.5] if full else [0.5, 1.0],
    }
    if quick:
        s["invdiff"] = replace(s["invdiff"], steps=3, batch_size=16, loss_timesteps=2, max_step_steps=5)
        s.update(per_digit=2, sample_steps=2, sweep=[0.5, 1.0])
    return s


class _Data:
    """One setting's data, read once: training set, eval reference, attribute measurement."""

    def __init__(self, setting: Setting, resolution: int, data_seed: int, workdir: str):
        self.setting = setting
        if setting.attribute == "color":
            self.train = colored_digits("train", p=setting.p, num_colors=setting.num_values, resolution=resolution, seed=data_seed)
            self.eval = colored_digits("eval", num_colors=setting.num_values, resolution=resolution, seed=data_seed)
            self.measure = lambda images, prompt_ids: predict_color(images, setting.num_values)
            self.spec = {"name": "colored-digits", "p": setting.p, "num_colors": setting.num_values,
                         "resolution": resolution, "seed": data_seed}
        else:
            from .data import load_dataset
            from .data.layout_digits import LayoutProbe, layout_digits
            from .data.stroke_digits import ThicknessProbe, stroke_digits, write_imagefolder

            if setting.attribute == "thickness":
                train = stroke_digits("train", p=setting.p, resolution=resolution, seed=data_seed)
                self.eval = stroke_digits("eval", resolution=resolution, seed=data_seed)
                self.measure = ThicknessProbe(self.eval)
            else:
                train = layout_digits("train", setting.attribute, p=setting.p, resolution=resolution, seed=data_seed)
                self.eval = layout_digits("eval", setting.attribute, resolution=resolution, seed=data_seed)
                self.measure = LayoutProbe(self.eval, setting.attribute)
            # Through the generic imagefolder path, as the base was trained (scripts/make_assets.py).
            self.train = load_dataset(write_imagefolder(train, os.path.join(workdir, f"{setting.attribute}_train")))
            self.spec = {"name": "imagefolder", "path": f"{train.name} train split", "p": setting.p, "resolution": resolution}
        attribute = self.train.attributes[setting.attribute]
        digit = self.train.attributes["digit"]
        self.true_groups = digit * setting.num_values + attribute
        self.minority = attribute != digit % setting.num_values
        self.majority = torch.tensor([majority_color(d, setting.num_values) for d in range(10)])


def _evaluate(base, guidance, strength, settings, seed, classifier, data: _Data, band_start: int = 0, guidance_every: int = 1):
    """Sample `per_digit` images per digit and score them. Returns (metrics dict, images).
    band_start: the setting's attribute band; every row is sampled with the same sampler
    (deterministic DDIM in the band, stochastic below it: sampling.STOCHASTIC_BELOW_BAND).
    guidance_every: G's body at every k-th step, its output reused between (GuidedSchedule)."""
    per = settings["per_digit"]
    ids = torch.arange(10).repeat_interleave(per)
    seeds = [seed * 1_000_000 + i for i in range(ids.numel())]
    images = sample(GuidedDenoiser(base, guidance, strength), ids, seeds, settings["sample_steps"],
                    settings["guidance_scale"], progress=False, band_start=band_start, guidance_every=guidance_every)
    result = evaluate_samples(images, ids, 10, data.setting.num_values, classifier, data.eval.images, data.majority,
                              attributes=data.measure(images, ids))
    return {k: result[k] for k in ("bias", "bias_std", "digit_accuracy", "frechet_distance", "majority_share")}, images


def max_step_alignment(losses, train, cfg: DebiasConfig, minority, true_groups) -> List[Dict]:
    """Evaluation-only: how each (aggregation, max step, grouping) choice lines up with the true
    groups, from the same frozen losses. The "before/after" of the max-step design choices."""
    rows = []
    for aggregation in ("mean", "spread"):
        for method in ("official", "mixture", "gap", "otsu"):
            for per_prompt in (False, True):
                c = replace(cfg, aggregation=aggregation, max_step=method, per_prompt_groups=per_prompt)
                weights, scores = weights_from_losses(losses, train.prompt_ids, c)
                a = group_alignment(weights, scores, minority, true_groups)
                rows.append({"aggregation": aggregation, "max_step": method, "per_prompt": per_prompt,
                             "score_auroc_minority": a["score_auroc_minority"],
                             "balanced_minority_share": a["balanced_minority_share"]})
    return rows


def _mean_std(values: List[float]) -> Dict[str, float]:
    t = torch.tensor(values, dtype=torch.float64)
    return {"mean": float(t.mean()), "std": float(t.std(unbiased=True)) if t.numel() > 1 else 0.0}


def _row_config(row: str, cfg: DebiasConfig) -> DebiasConfig:
    if row == "erm":
        return replace(cfg, lam=0.0)
    if row in ("official", "jtt", "groupdro"):
        keep = {k: getattr(cfg, k) for k in ("steps", "batch_size", "loss_timesteps", "loss_draws", "max_step_steps", "seed")}
        return recipe_config(row, **keep)  # the same G_psi and budget, the recipe's own objective
    return cfg


def _cell_key(setting: Setting, seed: int, row: str, settings: Dict) -> str:
    blob = json.dumps({"setting": asdict(setting), "seed": seed, "row": row,
                       "settings": {k: (asdict(v) if hasattr(v, "__dataclass_fields__") else v) for k, v in settings.items()}},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def _run_cell(setting, data: _Data, seed, row, settings, classifier, frozen_of, workdir, guidance_every=()) -> Dict:
    """One (setting, seed, row): train if guided, sample over the strength sweep, evaluate.
    guidance_every: sampling-only variants of a guided row, evaluated at strength 1 on the same G
    and seeds (extra["guidance_every"], {k: metrics}); not part of the demo's cells."""
    cfg = replace(settings["invdiff"], seed=seed)
    band_start = band_start_of(cfg, frozen_of(cfg)["losses"], data.train.prompt_ids, 1000)
    if row in ("base", "balanced"):
        folder = shipped_base(name=setting.base if row == "base" else setting.balanced_base)
        base = FrozenBase.from_pretrained(folder).freeze()
        res, images = _evaluate(base, None, 1.0, settings, seed, classifier, data, band_start)
        return {"result": res, "sweep": [], "images": images, "extra": {"band_start": band_start}}
    base_dir = shipped_base(name=setting.base)
    base = FrozenBase.from_pretrained(base_dir).freeze()
    n = len(data.train)
    weights = {"erm": torch.ones(n, 1), "oracle": torch.nn.functional.one_hot(data.true_groups, 10 * setting.num_values).float()}.get(row)
    run_dir = os.path.join(workdir, "runs", f"{setting.key}_seed{seed}_{row}")
    vcfg = _row_config(row, cfg)
    started = time.time()
    result = debias(base_dir, data.train, run_dir, vcfg, data.spec, weights=weights, progress=False,
                    frozen=frozen_of(cfg), overwrite=True)
    extra = {"train_seconds": time.time() - started, "t_min": result["meta"]["t_min"], "band_start": band_start}
    if "calibration" in result["meta"]:  # the gains the label-free calibration chose, per prompt
        cal = result["meta"]["calibration"]
        extra["calibration"] = {"default_gain": cal["default_gain"], "warnings": cal["warnings"],
                                "separation": cal.get("separation"),
                                **({"gains": {k: v["gain"] for k, v in cal["prompts"].items()},
                                    "status": {k: v["status"] for k, v in cal["prompts"].items()},
                                    "readout": {k: [round(x, 3) for x in [v["base_share"]] + v["readout_shares"]]
                                                for k, v in cal["prompts"].items()}}
                                   if cal["prompts"] else {"pooled": cal.get("pooled"), "mode": cal["mode"]})}
    if weights is None and result["weights"].shape[1] > 1:
        a = group_alignment(result["weights"], result["scores"], data.minority, data.true_groups, vcfg.groups)
        extra["balanced_minority_share"] = a["balanced_minority_share"]
        extra["minority_recall"] = a["minority_recall"]
        extra["score_auroc_minority"] = a["score_auroc_minority"]
    _, guidance = load_model(run_dir)
    sweep, res, images = [], None, None
    for s in settings["sweep"]:
        r_s, imgs = _evaluate(base, guidance, s, settings, seed, classifier, data, band_start)
        sweep.append({"strength": s, **{k: r_s[k] for k in ("bias", "digit_accuracy", "frechet_distance")}})
        if s == 1.0:
            res, images = r_s, imgs
    if res is None:
        res, images = _evaluate(base, guidance, 1.0, settings, seed, classifier, data, band_start)
    if guidance_every:
        extra["guidance_every"] = {str(k): _evaluate(base, guidance, 1.0, settings, seed, classifier, data, band_start,
                                                     guidance_every=k)[0] for k in guidance_every}
    return {"result": res, "sweep": sweep, "images": images, "extra": extra}


def setting_targets(models: Dict[str, Dict], design: bool) -> Dict[str, bool]:
    """Issue 21's targets for InvDiff at the defaults and strength 1, from the means over seeds,
    the same on every setting (design or held out); the seed spread only with two seeds or more."""
    inv, base = models["invdiff"], models["base"]
    t = {"bias_at_most_0.5_of_base": inv["bias"] <= 0.5 * base["bias"],
         "frechet_at_most_1.15_of_base": inv["frechet_distance"] <= 1.15 * base["frechet_distance"],
         "digit_accuracy_within_2_points": inv["digit_accuracy"] >= base["digit_accuracy"] - 0.02}
    if len(inv.get("per_seed", {}).get("bias", [])) > 1:
        t["bias_seed_std_at_most_0.05"] = inv["bias_seed_std"] <= 0.05
    for key in ("balanced_minority_share", "minority_recall"):
        if key in inv:
            t[f"{key}_at_least_0.5"] = inv[key] >= 0.5
    if design and "oracle" in models:
        t["bias_within_0.08_of_oracle"] = inv["bias"] <= models["oracle"]["bias"] + 0.08
    if "erm" in models:
        t["bias_not_worse_than_erm"] = inv["bias"] <= models["erm"]["bias"]
    return t


def check_request(settings_keys: Sequence[str], rows: Sequence[str], seeds: Sequence[int]) -> None:
    """Every requested setting, row and seed is valid and every base it needs is shipped: one
    clear error before any compute."""
    unknown = [k for k in settings_keys if k not in SETTINGS]
    if unknown:
        raise ValueError(f"unknown setting(s) {unknown}; choose from {list(SETTINGS)}")
    bad = [r for r in rows if r not in ROWS]
    if bad:
        raise ValueError(f"unknown row(s) {bad}; choose from {list(ROWS)}")
    if "base" not in rows or "invdiff" not in rows:
        raise ValueError("the rows must include 'base' and 'invdiff' (the targets compare them)")
    if not seeds or len(set(seeds)) != len(seeds) or any(s < 0 for s in seeds):
        raise ValueError(f"seeds must be distinct non-negative integers, got {list(seeds)}")
    for k in settings_keys:
        shipped_base(name=SETTINGS[k].base)
        if "balanced" in rows:
            shipped_base(name=SETTINGS[k].balanced_base)


def run_demo(out: str = "demo_out", seeds: Sequence[int] = (0,), quick: bool = False, full: bool = False,
             settings_keys: Optional[Sequence[str]] = None, rows: Optional[Sequence[str]] = None,
             progress: bool = True, cached_only: bool = False) -> Dict:
    """Run the demo; returns the report (also written to OUT/report.json and OUT/report.md).
    cached_only: report the cells already in OUT/cells and run nothing; a row is reported for a
    setting only where every requested seed has it, and the report lists what was not run."""
    t_start = time.time()
    settings_keys = list(settings_keys or (SETTINGS if full else [DESIGN]))
    rows = list(rows or (ROWS if full else MAIN_ROWS))
    check_request(settings_keys, rows, seeds)
    settings = demo_settings(quick, full)
    classifier = load_digit_classifier()
    check_output_folder(out, "demo")  # the command line checked it too; a library caller may not have
    os.makedirs(os.path.join(out, "cells"), exist_ok=True)
    # invdiff's marker (outputs.py) before the first cell is cached, so that a demo cut short is
    # still recognised as its own and the next run resumes from its cells.
    write_marker(out, "demo", set(os.listdir(out)) | {"cells"})
    workdir = tempfile.mkdtemp(prefix="invdiff-demo-")
    report_settings = []
    not_run: List[str] = []
    grids = {}
    show = min(settings["per_digit"], 8)
    try:
        for key in settings_keys:
            setting = SETTINGS[key]
            resolution = FrozenBase.from_pretrained(shipped_base(name=setting.base)).unet.config.sample_size
            data = _Data(setting, resolution, 0, workdir)
            per_seed: Dict[str, List[Dict]] = {r: [] for r in rows}
            alignment_table = None
            for seed in seeds:
                frozen_cache: Dict = {}

                def frozen_of(cfg, _cache=frozen_cache):
                    # The frozen model's losses and predictions on the fixed draws: computed once
                    # per (setting, seed), so every guided row trains on identical draws.
                    if "v" not in _cache:
                        base = FrozenBase.from_pretrained(shipped_base(name=setting.base)).freeze()
                        _cache["v"] = dict(zip(("losses", "timesteps", "bank"), collect_losses(
                            base, data.train.training_view(), cfg.loss_timesteps, cfg.loss_draws, cfg.seed,
                            progress=False, return_bank=True)))
                    return _cache["v"]

                for row in rows:
                    cell_path = os.path.join(out, "cells", f"{key}_seed{seed}_{row}_{_cell_key(setting, seed, row, settings)}")
                    if os.path.isfile(cell_path + ".json"):
                        cell = json.load(open(cell_path + ".json"))
                        images = load_file(cell_path + ".safetensors")["images"]
                    elif cached_only:
                        not_run.append(f"{key} seed {seed} {row}")
                        continue
                    else:
                        if progress:
                            print(f"== {key} seed {seed}: {row}", flush=True)
                        ran = _run_cell(setting, data, seed, row, settings, classifier, frozen_of, workdir)
                        per = settings["per_digit"]
                        pick = torch.cat([torch.arange(d * per, d * per + show) for d in range(10)])
                        images = ran["images"][pick].contiguous()
                        cell = {"result": ran["result"], "sweep": ran["sweep"], "extra": ran["extra"]}
                        with atomic_path(cell_path + ".safetensors") as tmp:
                            save_file({"images": images}, tmp)
                        atomic_write_json(cell_path + ".json", cell)
                    if progress:
                        r = cell["result"]
                        print(f"   {key} seed {seed} {row:9s} bias={r['bias']:.3f} acc={r['digit_accuracy']:.3f} "
                              f"fd={r['frechet_distance']:.1f}", flush=True)
                    per_seed[row].append(cell)
                    if setting.design and seed == seeds[0] and row in ("base", "invdiff"):
                        grids[row] = images
                if setting.design and seed == seeds[0] and alignment_table is None and "invdiff" in rows:
                    alignment_table = max_step_alignment(frozen_of(replace(settings["invdiff"], seed=seed))["losses"],
                                                         data.train, replace(settings["invdiff"], seed=seed),
                                                         data.minority, data.true_groups)
            per_seed = {row: cells for row, cells in per_seed.items() if len(cells) == len(seeds)}
            if {"base", "invdiff"} <= set(per_seed):
                report_settings.append(_summarise(setting, per_seed, settings, alignment_table))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    report = {
        "seeds": list(seeds),
        "rows": rows,
        "settings": report_settings,
        "not_run": not_run,
        "cached_only": cached_only,
        "config": {k: (asdict(v) if hasattr(v, "__dataclass_fields__") else v) for k, v in settings.items()},
        "seconds": time.time() - t_start,
    }
    _write_report(out, report, grids, show)
    write_marker(out, "demo", os.listdir(out))
    return report


def _summarise(setting: Setting, per_seed: Dict[str, List[Dict]], settings: Dict, alignment_table) -> Dict:
    models = {}
    for row, cells in per_seed.items():
        entry = {}
        for key in ("bias", "digit_accuracy", "frechet_distance"):
            values = [c["result"][key] for c in cells]
            ms = _mean_std(values)
            entry[key], entry[key + "_seed_std"] = ms["mean"], ms["std"]
            entry.setdefault("per_seed", {})[key] = values
        entry["majority_share"] = torch.tensor([c["result"]["majority_share"] for c in cells]).mean(0).tolist()
        if cells[0]["sweep"]:
            entry["sweep"] = [
                {"strength": s["strength"], **{k: _mean_std([c["sweep"][i][k] for c in cells])["mean"]
                                                for k in ("bias", "digit_accuracy", "frechet_distance")}}
                for i, s in enumerate(cells[0]["sweep"])
            ]
        for key in ("balanced_minority_share", "minority_recall", "score_auroc_minority", "train_seconds", "t_min", "band_start"):
            if key in cells[0]["extra"]:
                entry[key] = _mean_std([c["extra"][key] for c in cells])["mean"]
        if "calibration" in cells[0]["extra"]:  # what the label-free calibration chose, seed by seed
            entry["calibration"] = [{"separation": c["extra"]["calibration"].get("separation"),
                                     "gains": sorted((c["extra"]["calibration"].get("gains") or {}).values()),
                                     "default_gain": c["extra"]["calibration"]["default_gain"]} for c in cells]
        models[row] = entry
    return {
        "name": setting.key,
        "title": setting.title,
        "design": setting.design,
        "base": setting.base,
        "attribute": setting.attribute,
        "p": setting.p,
        "num_values": setting.num_values,
        "models": models,
        "targets": setting_targets(models, setting.design),
        "max_step_alignment": alignment_table,
    }


def _pareto_rows(models: Dict[str, Dict]) -> Dict[str, List[Dict]]:
    return {row: m.get("sweep") or [{"strength": 1.0, **{k: m[k] for k in ("bias", "frechet_distance")}}]
            for row, m in models.items()}


def _write_report(out: str, report: Dict, grids: Dict, show: int) -> None:
    atomic_write_json(os.path.join(out, "report.json"), report)
    seeds = report["seeds"]
    took = ("reported from cached cells (the time to make them is not included)" if report.get("cached_only")
            else f"{report['seconds']:.0f} s")
    md = ["# InvDiff demo\n", f"Seeds {seeds}; {took}. Means over seeds at strength 1 "
          f"(± std over seeds); {report['config']['per_digit']} samples per digit per seed, "
          f"w = {report['config']['guidance_scale']:g}.\n"]
    for entry in report["settings"]:
        models = entry["models"]
        md.append(f"## {entry['title']} ({'design setting' if entry['design'] else 'held out'})\n")
        md.append("| model | Bias | digit accuracy | Frechet distance |\n|---|---|---|---|")
        for row, m in models.items():
            md.append(f"| {row} | {m['bias']:.3f} ± {m['bias_seed_std']:.3f} | {m['digit_accuracy']:.3f} ± "
                      f"{m['digit_accuracy_seed_std']:.3f} | {m['frechet_distance']:.0f} ± {m['frechet_distance_seed_std']:.0f} |")
        md.append("\nTargets (InvDiff, strength 1): " + "; ".join(f"{k}: {'met' if v else 'MISSED'}" for k, v in entry["targets"].items()))
        inv = models["invdiff"]
        if "balanced_minority_share" in inv:
            md.append(f"\nInferred groups (evaluation only): balanced minority share {inv['balanced_minority_share']:.3f} "
                      f"(perfect groups 0.5), score AUROC {inv['score_auroc_minority']:.3f}; attribute band t >= {inv['band_start']:.0f} "
                      f"(deterministic DDIM there, stochastic below, for every row); G acts for t >= {inv['t_min']:.0f}.")
        if "minority_recall" in inv:
            md.append(f"Minority recall of the high-loss groups {inv['minority_recall']:.3f}.")
        if inv.get("calibration"):
            md.append("\nCalibrated push (label free), per seed: " + "; ".join(
                f"separation {c['separation'] or float('nan'):.1f}, "
                + (f"gains {c['gains'][0]:.2f}-{c['gains'][-1]:.2f}" if c["gains"]
                   else f"one gain {c['default_gain']:.2f}" if c["default_gain"] != 1.0 else "not calibrated, gain 1")
                for c in inv["calibration"]) + ".")
        sweeps = {row: m["sweep"] for row, m in models.items() if m.get("sweep")}
        if sweeps:
            md.append("\n| model | strength | Bias | digit accuracy | Frechet distance |\n|---|---|---|---|---|")
            for row, sw in sweeps.items():
                md += [f"| {row} | {r['strength']:g} | {r['bias']:.3f} | {r['digit_accuracy']:.3f} | {r['frechet_distance']:.0f} |" for r in sw]
        names = {"color": COLOR_NAMES, **LAYOUT_ATTRIBUTES, "thickness": THICKNESS_NAMES}[entry["attribute"]]
        md.append(f"\nMajority-{entry['attribute']} share per digit (the data has {entry['p']:g}):\n")
        md.append("| model | " + " | ".join(f"{d} ({names[d % entry['num_values']]})" for d in range(10)) + " |\n|---|" + "---|" * 10)
        for row in ("base", "invdiff", "oracle"):
            if row in models:
                md.append(f"| {row} | " + " | ".join(f"{s:.2f}" for s in models[row]["majority_share"]) + " |")
        pareto = f"pareto_{entry['name']}.png"
        pareto_chart(_pareto_rows(models), os.path.join(out, pareto), models["base"]["frechet_distance"],
                     title=f"{entry['title']}: Bias against Frechet distance")
        md.append(f"\n![pareto]({pareto})\n")
        if entry.get("max_step_alignment"):
            md.append("### Max step: how the inferred groups line up with the true ones (first seed, evaluation only)\n")
            md.append("`balanced minority share`: the minority share that equal weight per inferred group gives "
                      "(0.5 = perfect groups).\n")
            md.append("| aggregation | max step | groups | AUROC of score | balanced minority share |\n|---|---|---|---|---|")
            md += [f"| {r['aggregation']} | {r['max_step']} | {'per prompt' if r['per_prompt'] else 'pooled'} | "
                   f"{r['score_auroc_minority']:.3f} | {r['balanced_minority_share']:.3f} |" for r in entry["max_step_alignment"]]
            md.append("")
    design = next((e for e in report["settings"] if e["design"]), None)
    if design is not None and {"base", "invdiff"} <= set(grids):
        labels = [f"digit {d} ({COLOR_NAMES[majority_color(d, design['num_values'])]})" for d in range(10)]
        sample_grid(grids, labels, show, os.path.join(out, "samples_base_vs_invdiff.png"),
                    title=f"{design['title']}: base vs InvDiff (seed {seeds[0]})")
        bias_bar_chart(design["models"], os.path.join(out, "bias.png"), title=f"Bias, {design['title']} (lower is better)")
        md.append("![samples](samples_base_vs_invdiff.png)\n\n![bias](bias.png)\n")
    if report.get("not_run"):
        md.append("## Not run\n\nCells of the requested matrix that this report does not hold: "
                  + "; ".join(report["not_run"]) + ".\n")
    write_markdown(os.path.join(out, "report.md"), "\n".join(md) + "\n")
    for entry in report["settings"]:
        print(f"\n{entry['title']} ({'design' if entry['design'] else 'held out'})")
        for row, m in entry["models"].items():
            print(f"  {row:9s} bias={m['bias']:.3f} acc={m['digit_accuracy']:.3f} fd={m['frechet_distance']:.1f}")
        for k, v in entry["targets"].items():
            print(f"  {k}: {'met' if v else 'MISSED'}")
    print(f"wrote {out}/report.json, report.md and the pictures ({report['seconds']:.0f} s)")
