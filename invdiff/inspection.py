"""`invdiff inspect`: what the max step found, in pictures, before a min step is spent on it (issue 26).

A user has no bias labels, so nothing else tells them whether a prompt's high-loss group is the
under-represented attribute or just blurry photos. The report shows, per prompt:

- the high-loss group's training images beside a fixed-seed random draw of the rest
  (`groups/<prompt>.png`, at most GRID_IMAGES a group, each block ordered by score, highest
  first). They are the training images as loaded (an imagefolder's own files, resized and
  cropped as training saw them), never latents: a latent base's grids show the files its
  VAE encoded, so no VAE decode is spent on them;
- the score histogram with the cut (`scores.png`, one panel per prompt);
- one summary table (report.md and report.json): group sizes, the smaller group's share, the
  cut's bootstrap stability (environments.cut_stability), how far the high group stands out
  (calibration.readout_reference's separation), and warnings.

The same report goes into every `debias` run folder, under inspect/ (write_run_inspection,
called by model_folders/write.py). `invdiff inspect --base` runs the max step alone
(inspect_base); `invdiff inspect --run` reads a run folder's saved losses and groups
(inspect_run). Both end in `write_report`.
"""
from __future__ import annotations

import dataclasses
import math
import os
from typing import Callable, Dict, List, Optional, Sequence

import torch

from .calibration import SEPARATION_TRUST, readout_reference
from .config import DebiasConfig
from .data import load_dataset
from .data.base import DataError, DiffusionDataset
from .environments import (
    SMALL_GROUP_SHARE,
    UNSTABLE_BELOW,
    collect_losses,
    cut_stability,
    groups_from_losses,
    hard_assignment,
    load_environments,
    max_step_policy,
)
from .io import CheckpointError, atomic_path, atomic_write_json, load_safetensors
from .model_folders import RUN_META, read_json_object
from .report import _mpl, save_png, to_uint8, write_markdown
from .sampling.job import prompt_dirname

INSPECT_DIR = "inspect"  # the subfolder of a debias run folder that holds its report
MADE_BY = "invdiff inspect"
# Images per group and prompt in a grid: enough to name an attribute, small enough that a run
# folder's report stays a few hundred KB (colored digits: 10 grids of about 20 KB).
GRID_IMAGES = 32
GRID_COLUMNS = 8
TILE_SIDE = 64  # pixels a tile side: small images are repeated up to it, large ones averaged down
GAP = 2  # grey pixels between tiles
BLOCK_GAP = 24  # white pixels between the high group's block and the rest's
MAX_PROMPTS = 64  # prompts a report shows at most (a captioned dataset has one per image); --prompts picks others
PANELS_PER_FIGURE = 20  # histogram panels per scores PNG
# The thresholds of the warnings are the max step's and the calibration's own, measured there:
# a group below SMALL_GROUP_SHARE of its prompt; a cut whose high group's bootstrap Jaccard index is
# below UNSTABLE_BELOW; a high group that stands less than SEPARATION_TRUST robust standard
# deviations above the rest (a normal or Student-t majority alone, cut the same way, reads
# 2.2-2.3, 99th percentile 3.1-3.2; colored digits at p = 0.9 reads 5.3): no clear tail.
THRESHOLDS = {"small_group_share": SMALL_GROUP_SHARE, "unstable_below": UNSTABLE_BELOW,
              "separation_below": SEPARATION_TRUST}

WHAT_TO_LOOK_FOR = """\
What to look for, per prompt:
- **Can you name what the left block shares?** If it is an attribute the prompt should not decide
  (a colour, a gender, a background), the min step will push towards it: that is what debias is for.
  If it is image quality (blur, crops, watermarks, broken files), debias would push towards that:
  clean the data first.
- **Warnings.** A group below {small:.0%} of the prompt is a few outliers, not a minority; a cut with
  stability below {unstable} is partly chance; a separation below {sep} robust sd means the scores
  have no clear tail, and the cut falls inside one population.
- **The histogram.** A minority shows as a second bump or a long right tail beyond the cut; one
  smooth hump means there is little for the max step to find.
"""


# ----------------------------------------------------------------------------- pictures


def tile_side(height: int) -> int:
    """The side of a tile for images `height` pixels high: an integer multiple of it up to
    TILE_SIDE (so every pixel shows exactly), or TILE_SIDE for larger images."""
    return height * max(1, TILE_SIDE // height) if height <= TILE_SIDE else TILE_SIDE


def thumbnails(images: torch.Tensor) -> torch.Tensor:
    """(M, C, H, H) in [-1, 1] (C = 1 or 3) -> (M, s, s, 3) uint8 tiles, s = tile_side(H).
    Upscaling repeats pixels (no smoothing, so a tile is the image itself); downscaling averages
    areas (no aliasing of fine texture)."""
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    side, height = tile_side(images.shape[-1]), images.shape[-1]
    if side % height == 0:
        factor = side // height
        images = images.repeat_interleave(factor, -2).repeat_interleave(factor, -1)
    else:
        images = torch.nn.functional.interpolate(images.float(), size=(side, side), mode="area")
    return to_uint8(images)


def _block_width(side: int) -> int:
    return GRID_COLUMNS * side + (GRID_COLUMNS - 1) * GAP


def tile_box(block: int, index: int, side: int):
    """(top, left) pixel of tile `index` of `block` (0: the high group, 1: the rest) in a
    group_grid of tiles `side` pixels wide."""
    row, col = divmod(index, GRID_COLUMNS)
    return row * (side + GAP), block * (_block_width(side) + BLOCK_GAP) + col * (side + GAP)


def group_grid(high: torch.Tensor, rest: torch.Tensor) -> torch.Tensor:
    """(A, s, s, 3) and (B, s, s, 3) uint8 tiles -> (H, W, 3) uint8: the high group's tiles on
    the left, the rest's on the right, GRID_COLUMNS a row (tile_box), grey lines between tiles,
    white for empty places and between the blocks."""
    side = high.shape[1] if high.numel() else rest.shape[1]
    rows = max(1, math.ceil(high.shape[0] / GRID_COLUMNS), math.ceil(rest.shape[0] / GRID_COLUMNS))
    height = rows * side + (rows - 1) * GAP
    canvas = torch.full((height, 2 * _block_width(side) + BLOCK_GAP, 3), 255, dtype=torch.uint8)
    for block, tiles in enumerate((high, rest)):
        used = math.ceil(tiles.shape[0] / GRID_COLUMNS)  # rows holding tiles: grey lines there only
        left = tile_box(block, 0, side)[1]
        canvas[:max(0, used * (side + GAP) - GAP), left:left + _block_width(side)] = 128
        for index in range(used * GRID_COLUMNS):
            top, x = tile_box(block, index, side)
            canvas[top:top + side, x:x + side] = tiles[index] if index < tiles.shape[0] else 255
    return canvas


def score_histograms(rows: List[Dict], scores: torch.Tensor, prompt_ids: torch.Tensor, high: torch.Tensor,
                     cuts: Dict[int, List[float]], path: str) -> None:
    """One panel per summary row: the prompt's (N,) scores, the high group (bool (N,)) stacked
    on the rest, a dashed line at each cut (`cuts`: prompt id -> cut scores); titles in red for a
    prompt with warnings."""
    plt = _mpl()
    columns = min(4, len(rows))
    lines = math.ceil(len(rows) / columns)
    fig, axes = plt.subplots(lines, columns, figsize=(3.2 * columns, 2.3 * lines + 0.3), squeeze=False)
    for ax in axes.flat[len(rows):]:
        ax.axis("off")
    for ax, row in zip(axes.flat, rows):
        mine = prompt_ids == row["id"]
        values, top = scores[mine].double(), high[mine]
        bins = int(min(40, max(10, round(math.sqrt(values.numel()) * 2))))
        ax.hist([values[~top].numpy(), values[top].numpy()], bins=bins, stacked=True, color=["#9a9a9a", "#e07020"],
                label=["rest", "high-loss group"])
        for cut in cuts.get(row["id"], []):
            ax.axvline(cut, color="#202020", ls="--", lw=1)
        sizes = " | ".join(str(s) for s in row["group_sizes"])
        stability = "n/a" if row["stability"] is None else f"{row['stability']:.2f}"
        ax.set_title(f"{_short(row['prompt'], 28)}\n{sizes}, stability {stability}", fontsize=8,
                     color="#b00000" if row["warnings"] else "black")
        ax.tick_params(labelsize=7)
    axes.flat[0].legend(fontsize=6, loc="upper right")
    fig.supxlabel("per-sample score (the max step's aggregation of the frozen model's losses)", fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=90)
    plt.close(fig)


def _short(text: str, most: int) -> str:
    return text if len(text) <= most else text[: most - 3] + "..."


# ----------------------------------------------------------------------------- the findings


def sample_groups(weights: torch.Tensor, k: int) -> torch.Tensor:
    """(N, K) or per-prompt (N, P*K) environments -> (N,) each sample's strongest group among
    its K (a prompt owns a block of K columns, so the column modulo K)."""
    return hard_assignment(weights) % k


def _cuts(values: torch.Tensor, groups: torch.Tensor, order: List[int]) -> List[float]:
    """The score cuts between groups ordered by mean score: midway between the top of one
    group and the bottom of the next (the groups a cut method draws do not overlap)."""
    cuts = []
    for lower, upper in zip(order, order[1:]):
        below, above = values[groups == lower], values[groups == upper]
        if below.numel() and above.numel():
            cuts.append(float((below.max() + above.min()) / 2))
    return cuts


def summarise(scores: torch.Tensor, groups: torch.Tensor, prompt_ids: torch.Tensor, prompts: Sequence[str], k: int,
              pooled: bool, stability: Dict[int, float], separation: torch.Tensor, shown: Sequence[int]):
    """Per prompt in `shown` (ids), the summary row, and each sample's membership of its high group.

    scores: (N,); groups: (N,) each sample's group in [0, K); prompt_ids: (N,). pooled: the groups
    were cut over all prompts together (stability then has one key, 0). separation: (P,) by prompt
    id (nan: none). The high group is the one of highest mean score, within the prompt, or over
    all samples when pooled. Returns (rows, high (N,) bool, cuts {prompt id: [score, ...]})."""
    high = torch.zeros(scores.shape[0], dtype=torch.bool)
    cuts: Dict[int, List[float]] = {}
    domains = [torch.ones_like(high)] if pooled else [prompt_ids == p for p in prompt_ids.unique().tolist()]
    order_of = {}
    for domain in domains:
        means = [float(scores[domain & (groups == g)].mean()) if bool((domain & (groups == g)).any()) else -math.inf
                 for g in range(k)]
        order = sorted(range(k), key=lambda g: means[g])
        high |= domain & (groups == order[-1])
        for p in prompt_ids[domain].unique().tolist():
            order_of[p] = order
    rows = []
    for p in shown:
        mine = prompt_ids == p
        n = int(mine.sum())
        order = order_of[p]
        sizes = [int((mine & (groups == g)).sum()) for g in order]  # from the lowest mean score up
        cuts[p] = _cuts(scores[mine].double(), groups[mine], order) if not pooled else _cuts(scores.double(), groups, order)
        smaller = min(sizes) / n if n else 0.0
        stable = stability.get(0 if pooled else p)
        sep = float(separation[p]) if p < separation.numel() else float("nan")
        warnings = []
        if smaller < SMALL_GROUP_SHARE:
            warnings.append(f"small group: {min(sizes)} of {n} samples ({smaller:.1%}, below {SMALL_GROUP_SHARE:.0%}): "
                            "likely a few outliers, not a minority")
        if stable is not None and stable < UNSTABLE_BELOW:
            warnings.append(f"unstable cut: the high group's bootstrap Jaccard index is {stable:.2f}, below {UNSTABLE_BELOW}")
        if not sep >= SEPARATION_TRUST:
            warnings.append(f"no clear tail: the high group stands {sep:.1f} robust sd above the rest, below {SEPARATION_TRUST}")
        rows.append({"prompt": prompts[p], "id": p, "samples": n, "group_sizes": sizes,
                     "high_group_size": int((mine & high).sum()), "smaller_share": smaller,
                     "stability": stable, "separation": sep if math.isfinite(sep) else None,
                     "cut": cuts[p][-1] if cuts[p] else None, "warnings": warnings})
    return rows, high, cuts


def _draw(rows: torch.Tensor, scores: torch.Tensor, seed: int) -> torch.Tensor:
    """At most GRID_IMAGES of `rows` ((M,) indices), a random draw seeded by `seed` when there are
    more, ordered by score, highest first."""
    if rows.numel() > GRID_IMAGES:
        rows = rows[torch.randperm(rows.numel(), generator=torch.Generator().manual_seed(seed))[:GRID_IMAGES]]
    return rows[scores[rows].argsort(descending=True, stable=True)]


def choose_prompts(prompts: Sequence[str], present: Sequence[int], wanted: Optional[Sequence[str]]) -> List[int]:
    """The prompt ids a report shows: those `wanted` (checked: one line naming the available
    prompts for one that is not in the data), else every prompt present, at most MAX_PROMPTS."""
    if not wanted:
        return list(present)[:MAX_PROMPTS]
    index = {prompts[p]: p for p in present}
    missing = [w for w in wanted if w not in index]
    if missing:
        names = [prompts[p] for p in present]
        listed = ", ".join(repr(n) for n in names[:20]) + (f" and {len(names) - 20} more" if len(names) > 20 else "")
        raise DataError(f"--prompts {missing[0]!r} is not a prompt of the data; its prompts: {listed}")
    return list(dict.fromkeys(index[w] for w in wanted))[:MAX_PROMPTS]


def write_report(folder: str, *, scores: torch.Tensor, weights: torch.Tensor, losses: Optional[torch.Tensor],
                 prompt_ids: torch.Tensor, prompts: Sequence[str], sample_ids: torch.Tensor, config: DebiasConfig,
                 pixels: Optional[Callable[[torch.Tensor], torch.Tensor]], names: Optional[Sequence[str]],
                 source: Dict, wanted: Optional[Sequence[str]] = None,
                 stability: Optional[Dict[int, float]] = None) -> Dict:
    """Write the report into `folder` (made if missing; files written atomically): report.md,
    report.json, scores.png (scores-2.png, ... past PANELS_PER_FIGURE prompts) and with `pixels`
    groups/<prompt>.png. Returns what report.json holds.

    scores: (N,) the scores the groups were cut from; weights: (N, K) or (N, P*K) environments
    (anything else, e.g. JTT's (N, 1), is cut again from `losses` with the config's policy);
    losses: (N, T) frozen losses, for the separation (None: not measured); prompt_ids,
    sample_ids: (N,). pixels(rows (M,) int64) -> (M, C, H, W) in [-1, 1], the training images of
    those rows (None: no grids); names: (N,) each row's file, for an imagefolder.
    stability: {prompt id (0 when pooled): bootstrap stability}, computed when not given.
    wanted: prompt texts to show (choose_prompts)."""
    policy = max_step_policy(config)
    k = policy.groups
    if weights.shape[1] % k:
        weights, scores = groups_from_losses(losses, prompt_ids, policy)
    groups = sample_groups(weights, k)
    present = prompt_ids.unique().tolist()
    shown = choose_prompts(prompts, present, wanted)
    pooled = not policy.per_prompt or weights.shape[1] == k  # as environment_diagnostics keys its stability
    if stability is None:
        stability = cut_stability(scores, None if pooled else prompt_ids, policy)
    separation = torch.full((len(prompts),), float("nan"))
    if losses is not None:
        separation = readout_reference(losses, prompt_ids, config.aggregation, k, config.min_per_prompt_groups).separation
    rows, high, cuts = summarise(scores, groups, prompt_ids, prompts, k, pooled, stability, separation, shown)

    os.makedirs(folder, exist_ok=True)
    figures = []
    for start in range(0, len(rows), PANELS_PER_FIGURE):
        name = "scores.png" if start == 0 else f"scores-{start // PANELS_PER_FIGURE + 1}.png"
        score_histograms(rows[start:start + PANELS_PER_FIGURE], scores, prompt_ids, high, cuts, os.path.join(folder, name))
        figures.append(name)
    tile = None
    for row in rows:
        mine = prompt_ids == row["id"]
        # Seeded by the prompt id: a prompt's report shows the same images every time it is made.
        chosen = {"high": _draw(torch.nonzero(mine & high).flatten(), scores, 2 * row["id"]),
                  "rest": _draw(torch.nonzero(mine & ~high).flatten(), scores, 2 * row["id"] + 1)}
        row["shown"] = {part: sample_ids[r].tolist() for part, r in chosen.items()}
        if names is not None:
            row["files"] = {part: [names[i] for i in r.tolist()] for part, r in chosen.items()}
        if pixels is not None:
            row["grid"] = f"groups/{prompt_dirname(row['prompt'])}.png"
            made = {part: thumbnails(pixels(r)) for part, r in chosen.items() if r.numel()}
            side = next(iter(made.values())).shape[1]  # a shown prompt has samples, so one part has tiles
            tile = tile or side
            empty = torch.zeros((0, side, side, 3), dtype=torch.uint8)  # a pooled high group may miss a prompt
            save_png(group_grid(made.get("high", empty), made.get("rest", empty)), os.path.join(folder, row["grid"]))
    report = {"made_by": MADE_BY, "source": source, "groups": k, "pooled": pooled,
              "max_step": {"method": policy.method, "aggregation": policy.aggregation, "per_prompt": policy.per_prompt,
                           "loss_timesteps": config.loss_timesteps, "loss_draws": config.loss_draws, "seed": config.seed},
              "thresholds": THRESHOLDS, "grid_images": GRID_IMAGES, "tile_side": tile, "figures": figures,
              "left_out": [prompts[p] for p in present if p not in shown] if not wanted else [],
              "prompts": rows}
    atomic_write_json(os.path.join(folder, "report.json"), report)
    write_markdown(os.path.join(folder, "report.md"), markdown(report))
    return report


def markdown(report: Dict) -> str:
    """report.md from what report.json holds."""
    src = report["source"]
    if "run" in src:
        where = "this run folder" if src["run"] == "." else f"the run folder `{src['run']}`"
    else:
        data = src.get("data") or {}
        where = (f"the base `{src['base']}` on the data `{data.get('root', data.get('name', '?'))}` "
                 "(the max step alone, no min step)")
    per = "over all prompts together (pooled)" if report["pooled"] else "within each prompt"
    ms = report["max_step"]
    draws = f"{ms['loss_draws']} draw{'s' if ms['loss_draws'] != 1 else ''}"
    text = ["# What the max step found\n",
            f"From {where}. K = {report['groups']} groups {per}, cut by `{ms['method']}` from the `{ms['aggregation']}` "
            f"score of the frozen model's losses ({ms['loss_timesteps']} timesteps x {draws}, seed {ms['seed']}). "
            "No label was read.\n"]
    text.append(WHAT_TO_LOOK_FOR.format(small=SMALL_GROUP_SHARE, unstable=UNSTABLE_BELOW, sep=SEPARATION_TRUST))
    text.append("## Summary\n")
    text.append("| prompt | samples | group sizes (low to high score) | smaller group | stability | "
                "separation (robust sd) | warnings |\n|---|---|---|---|---|---|---|")

    def number(value, fmt):
        return "n/a" if value is None else format(value, fmt)

    for row in report["prompts"]:
        flags = "; ".join(w.split(":")[0] for w in row["warnings"]) or "-"
        prompt = row["prompt"].replace("|", "\\|")  # a prompt's own | would end its cell
        text.append(f"| {prompt} | {row['samples']} | {' / '.join(map(str, row['group_sizes']))} | "
                    f"{row['smaller_share']:.1%} | {number(row['stability'], '.2f')} | "
                    f"{number(row['separation'], '.1f')} | {flags} |")
    text.append("")
    warned = [(row["prompt"], w) for row in report["prompts"] for w in row["warnings"]]
    if warned:
        text.append("Warnings:\n")
        text += [f"- {prompt}: {w}" for prompt, w in warned]
        text.append("")
    if report["left_out"]:
        text.append(f"{len(report['left_out'])} more prompts are not shown (at most {MAX_PROMPTS}); "
                    "`invdiff inspect --prompts ...` shows the ones you name.\n")
    text.append("Stability: the mean Jaccard index between the high group and the high group cut from bootstrap "
                "resamples (1: the same cut every time). Separation: how far the high group's median stands above "
                "the rest's, in the rest's robust standard deviations.\n")
    text.append("## Scores\n")
    text.append("Per prompt, the histogram of the scores, the high-loss group in orange, the cut dashed; the title "
                "gives the group sizes (low to high score) and the stability, in red with a warning.\n")
    text += [f"![scores]({name})\n" for name in report["figures"]]
    text.append("## Groups\n")
    for row in report["prompts"]:
        shown = row["shown"]
        text.append(f"### {row['prompt']}\n")
        if "grid" in row:
            text.append(f"![{row['prompt']}]({row['grid']})\n")
        rest = row["samples"] - row["high_group_size"]
        text.append(f"Left: the high-loss group, {len(shown['high'])} of its {row['high_group_size']} images; right: "
                    f"{len(shown['rest'])} of the other {rest}, drawn at random (fixed seed). Each side is ordered by score, "
                    "highest first.\n")
        if "files" in row and row["files"]["high"]:
            text.append("High-loss group's files, as shown: " + ", ".join(f"`{n}`" for n in row["files"]["high"]) + "\n")
    return "\n".join(text)


# ----------------------------------------------------------------------------- the entry points


def _file_names(dataset: DiffusionDataset) -> Optional[List[str]]:
    files = getattr(dataset, "files", None)
    return list(files.names) if files is not None else None


def inspect_base(base, data: DiffusionDataset, pixels: DiffusionDataset, config: DebiasConfig, folder: str,
                 source: Dict, wanted: Optional[Sequence[str]] = None, progress: bool = True) -> Dict:
    """The max step alone, reported into `folder`. base: the loaded frozen base; data: the
    training data as it sees it (latents for a latent base: debiasing's _data_for_base);
    pixels: the same rows as images (the grids show these, never latents)."""
    latent = hasattr(base, "decode_latents")
    # collect_losses, not frozen_losses: no min step follows, so the bank of frozen predictions
    # (N x T x the image, twice) is not kept. A latent base sees the min step's batch size, as there.
    losses, _ = collect_losses(base, data, config.loss_timesteps, config.loss_draws, config.seed, progress=progress,
                               **({"batch_size": config.batch_size} if latent else {}))
    weights, scores = groups_from_losses(losses, data.prompt_ids, max_step_policy(config))
    return write_report(folder, scores=scores, weights=weights, losses=losses, prompt_ids=data.prompt_ids,
                        prompts=list(data.prompts), sample_ids=data.sample_ids, config=config,
                        pixels=pixels.load_images, names=_file_names(pixels), source=source, wanted=wanted)


def run_config(meta: Dict) -> DebiasConfig:
    """The DebiasConfig a run recorded (fields an older or newer invdiff does not know are left out)."""
    known = {f.name for f in dataclasses.fields(DebiasConfig)}
    return DebiasConfig(**{k: v for k, v in (meta.get("config") or {}).items() if k in known})


def dataset_from_record(spec: Dict) -> Optional[DiffusionDataset]:
    """The training data a run recorded ("data" in invdiff_run.json), loaded again, or None when
    the record does not say how (a dataset made in Python, such as the demo's held-out settings)."""
    name = str(spec.get("name", ""))
    if name == "colored-digits":
        return load_dataset("colored-digits", spec.get("split", "train"), spec.get("p", 0.9), spec.get("num_colors", 2),
                            spec.get("resolution"), spec.get("seed", 0))
    if (name == "imagefolder" or name.startswith("imagefolder:")) and spec.get("root"):
        return load_dataset(spec["root"], resolution=spec.get("resolution"), center_crop=spec.get("center_crop", True))
    return None


def _rows_of(dataset: DiffusionDataset, sample_ids: torch.Tensor, what: str) -> torch.Tensor:
    """(N,) the dataset's row of each sample id; a CheckpointError when some are not in it."""
    position = {int(s): i for i, s in enumerate(dataset.sample_ids.tolist())}
    missing = [int(s) for s in sample_ids.tolist() if int(s) not in position]
    if missing:
        raise CheckpointError(f"the data given lacks {len(missing)} of {what}'s samples (sample ids {missing[:5]}): "
                              "pass the --data the run was made with")
    return torch.tensor([position[int(s)] for s in sample_ids.tolist()], dtype=torch.long)


def _report_run(folder: str, weights: torch.Tensor, scores: torch.Tensor, losses: Optional[torch.Tensor],
                sample_ids: torch.Tensor, meta: Dict, dataset: DiffusionDataset, source: Dict,
                wanted: Optional[Sequence[str]], what: str) -> Dict:
    """A run's report from its saved groups (weights (N, K) or (N, P*K), scores (N,)) and losses
    ((N, T)), rows in `sample_ids` order ((N,)), with the prompts and images of `dataset`, which
    must hold those samples (a CheckpointError otherwise)."""
    config = run_config(meta)
    rows = _rows_of(dataset, sample_ids, what)
    prompt_ids = dataset.prompt_ids[rows]
    k = config.groups
    if weights.shape[1] % k == 0 and weights.shape[1] > k:
        # Per-prompt groups: a row's block of K columns is its prompt's place among the prompts
        # present (environments.infer_groups); another order means other data than the run's.
        present = prompt_ids.unique()
        if weights.shape[1] != present.numel() * k or not bool(
                (hard_assignment(weights) // k == torch.searchsorted(present, prompt_ids)).all()):
            raise CheckpointError(f"the data given does not match {what}'s groups (its prompts differ): pass the "
                                  "--data the run was made with")
    stability = None
    saved = (meta.get("diagnostics") or {}).get("cut_stability")
    if isinstance(saved, dict) and saved:
        stability = {int(p): float(s) for p, s in saved.items()}  # the run's own, from the same scores and seed
    names = _file_names(dataset)
    return write_report(folder, scores=scores, weights=weights, losses=losses, prompt_ids=prompt_ids,
                        prompts=list(dataset.prompts), sample_ids=sample_ids, config=config,
                        pixels=lambda r: dataset.load_images(rows[r]),
                        names=None if names is None else [names[i] for i in rows.tolist()], source=source,
                        wanted=wanted, stability=stability)


def inspect_run(run: str, folder: str, dataset: Optional[DiffusionDataset] = None,
                wanted: Optional[Sequence[str]] = None) -> Dict:
    """Report a debias run folder's saved groups (environments.safetensors) and frozen losses
    (losses.safetensors) into `folder`, with the images of `dataset` (None: the data the run
    recorded, loaded again)."""
    meta = read_json_object(os.path.join(run, RUN_META), "run metadata")
    if dataset is None:
        dataset = dataset_from_record(meta.get("data") or {})
        if dataset is None:
            raise DataError(f"--run {run!r}: its data ({meta.get('data')}) cannot be loaded again from the run's record; "
                            "pass --data (and its flags) as given to debias")
    env = load_environments(os.path.join(run, "environments.safetensors"))
    saved = load_safetensors(os.path.join(run, "losses.safetensors"), "frozen losses")
    if "losses" not in saved or "sample_ids" not in saved:
        raise CheckpointError(f"{run}/losses.safetensors holds no 'losses' and 'sample_ids': not an invdiff losses file")
    position = {int(s): i for i, s in enumerate(saved["sample_ids"].tolist())}
    if any(int(s) not in position for s in env["sample_ids"].tolist()):
        raise CheckpointError(f"{run}: losses.safetensors and environments.safetensors hold other samples")
    losses = saved["losses"][torch.tensor([position[int(s)] for s in env["sample_ids"].tolist()])]
    weights, scores = env["weights"], env.get("scores")
    if scores is None:  # a run that kept no scores: (N, 1) weights make write_report cut them again from the losses
        weights, scores = torch.ones(weights.shape[0], 1), torch.zeros(weights.shape[0])
    return _report_run(folder, weights, scores, losses, env["sample_ids"], meta, dataset,
                       {"run": os.path.abspath(run)}, wanted, f"the run {run!r}")


def write_run_inspection(folder: str, result: Dict, sample_ids: torch.Tensor) -> Optional[Dict]:
    """The report of a debias run being written (model_folders/write.py), into `folder`
    (RUN/inspect/). result: what debias returns ({"weights", "scores", "losses", "meta"});
    sample_ids: (N,) its rows' ids. Nothing is written for given groups (the oracle's, ERM's):
    there are no inferred groups to see. Data that cannot be loaded again from the run's record
    gives a report.md that says how to make the report."""
    meta = result["meta"]
    if meta.get("given_weights") or result.get("losses") is None:
        return None
    try:
        dataset = dataset_from_record(meta.get("data") or {})
        reason = "" if dataset is not None else "the run's data cannot be loaded again from its record"
    except (DataError, OSError) as exc:  # e.g. the imagefolder moved while the run trained
        dataset, reason = None, f"the run's data could not be loaded again ({exc})"
    if dataset is not None:
        try:
            return _report_run(folder, result["weights"], result["scores"], result["losses"], sample_ids, meta, dataset,
                               {"run": "."}, None, "the run")
        except CheckpointError as exc:  # a Python caller's data_spec that names other data than it trained on
            reason = f"the data the run's record names is not the data it was trained on ({exc})"
    os.makedirs(folder, exist_ok=True)
    write_markdown(os.path.join(folder, "report.md"),
                   f"# What the max step found\n\nNo report here: {reason}. Make it with "
                   "`invdiff inspect --run RUN --data DATA --out DIR`, DATA the data the run was made with.\n")
    return None
