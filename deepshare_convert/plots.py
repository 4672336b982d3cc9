"""PNG figures (matplotlib, Agg backend; imported only by the commands that draw)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

__all__ = ["xor_maps", "save_figure", "ed_boxplots", "affine_scatter"]


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | Path) -> Path:
    """Lay out, write (creating the folder) and close a figure."""
    plt = _plt()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def xor_maps(maps: Sequence[tuple[str, object]], path: str | Path) -> Path:
    """Decision maps of the XOR methods side by side (paper Fig. 7)."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(maps), figsize=(3.2 * len(maps), 3.4), squeeze=False)
    for ax, (title, grid) in zip(axes[0], maps):
        ax.imshow(grid.float().numpy(), extent=(-1, 1, -1, 1), cmap="coolwarm", vmin=0, vmax=1)
        ax.axhline(0, color="k", lw=0.5)
        ax.axvline(0, color="k", lw=0.5)
        ax.set_title(title, fontsize=10)
        ax.set_xticks([-1, 0, 1])
        ax.set_yticks([-1, 0, 1])
    fig.suptitle("2x2 checkerboard with one comparison: decision maps (red = class 1)")
    return save_figure(fig, path)


def ed_boxplots(report, path: str | Path) -> Path:
    """Per site, ED/d over spatial positions: aligned (blue) beside shuffled (orange), like paper Fig. 2."""
    import math

    plt = _plt()
    sites = report.sites
    fig, ax = plt.subplots(figsize=(max(6.0, 0.55 * len(sites) + 2), 4.2))
    for offset, attr, colour in ((-0.18, "aligned", "tab:blue"), (0.18, "shuffled", "tab:orange")):
        data = [[v for v in getattr(s, attr) if not math.isnan(v)] or [math.nan] for s in sites]
        ax.boxplot(data, positions=[i + offset for i in range(len(sites))], widths=0.32, patch_artist=True,
                   showfliers=False, boxprops={"facecolor": colour, "alpha": 0.6}, medianprops={"color": "k"})
    ax.set_xticks(range(len(sites)))
    ax.set_xticklabels([f"{s.module or s.name}\nd={s.channels}" for s in sites], rotation=60, ha="right", fontsize=7)
    ax.set_ylim(0, 1.02)
    ax.set_ylabel("effective dimension / d")
    ax.plot([], [], color="tab:blue", lw=6, alpha=0.6, label="aligned positions")
    ax.plot([], [], color="tab:orange", lw=6, alpha=0.6, label="shuffled within channel")
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title(f"{report.model}: gate effective dimension, N = {report.num_images}")
    return save_figure(fig, path)


def affine_scatter(report, path: str | Path) -> Path:
    """Per site, each channel's (beta, alpha): prototypes orange, replicates blue, like paper Supp. Fig. 10."""
    plt = _plt()
    sites = [s for s in report.sites if s.alpha is not None]
    cols = min(4, len(sites))
    rows = -(-len(sites) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.0 * cols, 2.8 * rows), squeeze=False)
    for ax, s in zip(axes.flat, sites):
        reps = [(b, a) for a, b, p in zip(s.alpha, s.beta, s.prototype) if not p]
        protos = [(b, a) for a, b, p in zip(s.alpha, s.beta, s.prototype) if p]
        for points, colour, label in ((reps, "tab:blue", "replicates"), (protos, "tab:orange", "prototypes")):
            if points:
                ax.scatter(*zip(*points), s=8, c=colour, label=label, alpha=0.8)
        ax.axhline(0, color="k", lw=0.4)
        ax.axvline(0, color="k", lw=0.4)
        ax.set_title(s.module or s.name, fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(sites):]:
        ax.axis("off")
    axes.flat[0].set_xlabel("beta", fontsize=8)
    axes.flat[0].set_ylabel("alpha", fontsize=8)
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(f"{report.model}: per-channel gate affine (beta, alpha)")
    return save_figure(fig, path)
