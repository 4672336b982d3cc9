"""PNG figures (matplotlib, Agg backend; imported only by the commands that draw)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

__all__ = ["xor_maps", "save_figure"]


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
