"""Pictures and tables: sample grids, the Bias bar chart, the strength sweep, report.md."""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch

from .io import atomic_path, atomic_write_text


def _mpl():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) in [-1, 1] -> (N, H, W, C) uint8."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1)


def save_png(image_hwc: torch.Tensor, path: str) -> None:
    from PIL import Image

    with atomic_path(path) as tmp:
        Image.fromarray(image_hwc.numpy()).save(tmp, format="PNG")


def sample_grid(
    panels: Dict[str, torch.Tensor], row_labels: Sequence[str], per_row: int, path: str, title: str = ""
) -> None:
    """Side-by-side panels (one per model) of samples, one row per prompt.

    panels: {name: (P * per_row, C, H, W)} ordered prompt-major.
    """
    plt = _mpl()
    names = list(panels)
    fig, axes = plt.subplots(1, len(names), figsize=(max(6.0, 1.5 + 0.45 * per_row * len(names)), 0.5 * len(row_labels) + 1.0))
    axes = [axes] if len(names) == 1 else list(axes)
    for ax, name in zip(axes, names):
        imgs = to_uint8(panels[name][: len(row_labels) * per_row])
        h, w = imgs.shape[1:3]
        grid = imgs.view(len(row_labels), per_row, h, w, -1).permute(0, 2, 1, 3, 4).reshape(len(row_labels) * h, per_row * w, -1)
        ax.imshow(grid.numpy(), interpolation="nearest")
        ax.set_title(name)
        ax.set_xticks([])
        ax.set_yticks([h * (i + 0.5) for i in range(len(row_labels))])
        ax.set_yticklabels(row_labels, fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def bias_bar_chart(models: Dict[str, Dict], path: str, title: str = "Bias (lower is better)") -> None:
    """models: {name: {"bias": float, "bias_std": float, ...}} -> bar chart with per-prompt std."""
    plt = _mpl()
    names = list(models)
    fig, ax = plt.subplots(figsize=(1.4 * len(names) + 1.5, 3.2))
    vals = [models[n]["bias"] for n in names]
    errs = [models[n].get("bias_seed_std", models[n].get("bias_std", 0.0)) for n in names]
    bars = ax.bar(names, vals, yerr=errs, capsize=4, color=["#888", "#c99", "#9c9", "#69c", "#a8d", "#dc7"][: len(names)])
    for b, v in zip(bars, vals):
        ax.text(b.get_x() + b.get_width() / 2, v + 0.02, f"{v:.3f}", ha="center", fontsize=8)
    ax.set_ylim(0, 1.1)
    ax.set_ylabel("Bias")
    ax.set_title(title)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def sweep_chart(sweep: List[Dict], path: str) -> None:
    """sweep: [{"strength", "bias", "digit_accuracy"}] -> Bias and accuracy against strength."""
    plt = _mpl()
    s = [r["strength"] for r in sweep]
    fig, ax = plt.subplots(figsize=(4.5, 3.2))
    ax.plot(s, [r["bias"] for r in sweep], "o-", label="Bias")
    ax.plot(s, [r["digit_accuracy"] for r in sweep], "s--", label="digit accuracy")
    ax.set_xlabel("guidance strength s (1 = trained r)")
    ax.set_ylim(0, 1.05)
    ax.legend()
    ax.set_title("InvDiff along the strength sweep")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def markdown_table(models: Dict[str, Dict], keys=("bias", "bias_std", "digit_accuracy", "frechet_distance")) -> str:
    header = "| model | " + " | ".join(keys) + " |\n|---|" + "---|" * len(keys) + "\n"
    rows = []
    for name, m in models.items():
        cells = []
        for k in keys:
            v = m.get(k)
            sd = m.get(k + "_seed_std")
            cells.append("-" if v is None else (f"{v:.3f} ± {sd:.3f}" if sd is not None else f"{v:.3f}"))
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    return header + "\n".join(rows) + "\n"


def write_markdown(path: str, text: str) -> None:
    atomic_write_text(path, text)


def pareto_chart(rows: Dict[str, List[Dict]], path: str, base_frechet: Optional[float] = None, title: str = "") -> None:
    """Bias against Frechet distance, one curve per model. rows: {model: [{"strength", "bias",
    "frechet_distance"}, ...]}: unguided rows have one point, guided rows one per strength s
    (labelled). Lower-left is better; the dotted line marks 1.15 x the base's Frechet distance."""
    plt = _mpl()
    fig, ax = plt.subplots(figsize=(6.0, 4.2))
    colors = ["#555", "#c66", "#4a4", "#27c", "#a5d", "#d90", "#3bb", "#999"]
    for color, (name, points) in zip(colors * 2, rows.items()):
        points = sorted(points, key=lambda r: r.get("strength", 1.0))
        xs = [r["frechet_distance"] for r in points]
        ys = [r["bias"] for r in points]
        ax.plot(xs, ys, "o-" if len(points) > 1 else "s", color=color, label=name, ms=5)
        if len(points) > 1:
            for r, x, y in zip(points, xs, ys):
                ax.annotate(f"s={r['strength']:g}", (x, y), textcoords="offset points", xytext=(4, 3), fontsize=7, color=color)
    if base_frechet is not None:
        ax.axvline(1.15 * base_frechet, ls=":", color="#888", lw=1)
        ax.text(1.15 * base_frechet, 0.02, " 1.15 x base", fontsize=7, color="#666")
    ax.set_xlabel("Frechet distance (lower is better)")
    ax.set_ylabel("Bias (lower is better)")
    ax.set_ylim(0, 1.05)
    ax.set_title(title or "Bias against quality")
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
