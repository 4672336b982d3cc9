"""Draw docs/img/method.png: one DeepShare group with C = 6 channels and P = 2 prototypes.

    python docs/img/make_method_figure.py

Left to right: the leader's input x^l, the DReLU on the two prototype channels (the
only comparisons), the balanced map pi copying each prototype's gate to its
replicates (replicate c -> (c - P) mod P, as in deepshare_convert.conversion.gates), the
per-channel affine of layer l, and a second layer of the same group that reuses the
same gates (layer sharing).  Pure drawing: nothing is trained or measured.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyBboxPatch  # noqa: E402

from deepshare_convert.conversion.gates import balanced_mapping  # noqa: E402
from deepshare_convert.plots import save_figure  # noqa: E402

C, P = 6, 2
PI = balanced_mapping(C, P).tolist()  # [0, 1, 0, 1, 0, 1]
PROTO_COLORS = ["#d95f02", "#1b9e77"]  # one colour per prototype; replicates wear their prototype's colour
PROTO_FILLS = ["#fbe0cc", "#d2efe6"]
GREY, INK = "#9a9a9a", "#222222"
H = 0.66  # box height (rows are 1 apart)


def row_y(c: int) -> float:
    return C - 1 - c  # channel 0 on top


def box(ax, x0, x1, y, text, face="white", edge=INK, size=10, lw=1.0, weight="normal", height=H):
    ax.add_patch(FancyBboxPatch((x0, y - height / 2), x1 - x0, height, boxstyle="round,pad=0.02,rounding_size=0.08",
                                facecolor=face, edgecolor=edge, linewidth=lw, zorder=2))  # fmt: skip
    ax.text((x0 + x1) / 2, y, text, ha="center", va="center", fontsize=size, color=INK, weight=weight, zorder=3)


def arrow(ax, x0, y0, x1, y1, color=INK, lw=1.2, style="-|>", rad=0.0):
    ax.annotate("", xy=(x1, y1), xytext=(x0, y0), zorder=1,
                arrowprops=dict(arrowstyle=style, color=color, lw=lw, shrinkA=0, shrinkB=0,
                                connectionstyle=f"arc3,rad={rad}"))  # fmt: skip


def panel(ax, x0, x1, y0, y1, title="", face="#f3f3f6", edge="#c8c8d0", ls="-"):
    ax.add_patch(FancyBboxPatch((x0, y0), x1 - x0, y1 - y0, boxstyle="round,pad=0.05,rounding_size=0.2",
                                facecolor=face, edgecolor=edge, linewidth=0.8, linestyle=ls, zorder=0))  # fmt: skip
    ax.text((x0 + x1) / 2, y1 - 0.12, title, ha="center", va="top", fontsize=10, color=INK)


def main() -> Path:
    fig, ax = plt.subplots(figsize=(13, 6.2))
    ax.set_xlim(-1.2, 16.3)
    ax.set_ylim(-2.45, 7.25)
    ax.set_aspect("equal")
    ax.axis("off")
    top = C - 0.3  # column headers

    # 1. leader input x^l: prototypes are the first P channels
    for c in range(C):
        proto = c < P
        box(ax, 0.0, 1.1, row_y(c), rf"$x^l_{c}$", face=PROTO_FILLS[c] if proto else "white",
            edge=PROTO_COLORS[c] if proto else GREY, lw=1.6 if proto else 1.0)  # fmt: skip
    ax.text(0.55, top + 0.1, "leader input\n" r"$x^l$ (C = 6)", ha="center", va="bottom", fontsize=10)
    ax.text(-0.45, row_y(0) - 0.5, "P = 2\nprototypes", ha="right", va="center", fontsize=9)
    ax.text(-0.45, (row_y(P) + row_y(C - 1)) / 2, "C − P = 4\nreplicates", ha="right", va="center", fontsize=9)
    ax.plot([-0.3, -0.3], [row_y(0) + 0.3, row_y(P - 1) - 0.3], color=INK, lw=1)
    ax.plot([-0.3, -0.3], [row_y(P) + 0.3, row_y(C - 1) - 0.3], color=GREY, lw=1)

    # 2. DReLU on the prototypes only
    for p in range(P):
        arrow(ax, 1.1, row_y(p), 1.8, row_y(p), color=PROTO_COLORS[p])
        box(ax, 1.8, 3.3, row_y(p), "DReLU", face=PROTO_FILLS[p], edge=PROTO_COLORS[p], lw=1.6, weight="bold")
    ax.text(2.55, top + 0.1, "comparisons\n" r"$1[x_p \geq 0]$", ha="center", va="bottom", fontsize=10)
    ax.text(2.55, (row_y(P) + row_y(C - 1)) / 2, "replicates:\nno comparison", ha="center", va="center",
            fontsize=9, color=GREY, style="italic")  # fmt: skip

    # 3. the balanced map pi: each prototype's gate is copied to its replicates (local indexing)
    for c in range(C):
        p = PI[c]
        arrow(ax, 3.3, row_y(p), 4.6, row_y(c), color=PROTO_COLORS[p], lw=1.4 if c < P else 1.1)
        box(ax, 4.6, 5.7, row_y(c), rf"$g_{p}$", face=PROTO_FILLS[p], edge=PROTO_COLORS[p], lw=1.3)
    ax.text(5.15, top + 0.1, "replicated\ngate " r"$g_{\pi(c)}$", ha="center", va="bottom", fontsize=10)
    panel(ax, 4.45, 5.85, row_y(C - 1) - 0.5, row_y(0) + 0.5, face="none", edge=INK, ls="--")
    ax.text(3.2, row_y(C - 1) - 0.75, r"$\pi = (0, 1, 0, 1, 0, 1)$", ha="center", va="center", fontsize=9.5)

    # 4. layer l: per-channel affine on the shared gate, times the layer's own input
    panel(ax, 6.3, 9.9, row_y(C - 1) - 0.55, top + 1.3,
          "layer $l$ (group leader)\nper-channel affine " r"$\alpha^l_c, \beta^l_c$")  # fmt: skip
    for c in range(C):
        p = PI[c]
        arrow(ax, 5.7, row_y(c), 6.45, row_y(c), color=PROTO_COLORS[p])
        box(ax, 6.45, 9.75, row_y(c), rf"$x^l_{c}\,(\alpha^l_{c}\,g_{p} + \beta^l_{c})$", edge=PROTO_COLORS[p])

    # 5. the layers in between, then layer l+1 of the same group (same C x H x W): same g, own alpha and beta
    box(ax, 10.45, 11.35, 2.5, "conv\nBN\n…", face="white", edge=GREY, height=2.2, size=9)
    arrow(ax, 9.9, 2.5, 10.45, 2.5)
    arrow(ax, 11.35, 2.5, 11.9, 2.5)
    panel(ax, 11.75, 16.05, row_y(C - 1) - 0.55, top + 1.3,
          "layer $l{+}1$ (same group)\nown affine " r"$\alpha^{l+1}_c, \beta^{l+1}_c$")  # fmt: skip
    for c in range(C):
        p = PI[c]
        box(ax, 12.05, 15.75, row_y(c), rf"$x^{{l+1}}_{c}\,(\alpha^{{l+1}}_{c}\,g_{p} + \beta^{{l+1}}_{c})$",
            edge=PROTO_COLORS[p])  # fmt: skip

    # layer sharing: the same six gate values feed layer l+1 (routed under the panels)
    y_bus = row_y(C - 1) - 1.25
    ax.plot([5.15, 5.15], [row_y(C - 1) - 0.55, y_bus], color=INK, lw=2.2, zorder=1)
    ax.plot([5.15, 13.9], [y_bus, y_bus], color=INK, lw=2.2, zorder=1)
    arrow(ax, 13.9, y_bus, 13.9, row_y(C - 1) - 0.55, lw=2.2)
    ax.text(9.5, y_bus - 0.32, "layer sharing: layer $l{+}1$ (same C×H×W) reuses $g$, no new comparisons",
            ha="center", va="center", fontsize=9.5)  # fmt: skip

    ax.text(7.4, -2.25, r"Comparisons per example for the whole group: $P \cdot H \cdot W = 2HW$ DReLUs, "
            r"instead of $2 \cdot C \cdot H \cdot W = 12HW$ ReLUs in the two original layers.",
            ha="center", va="center", fontsize=10)  # fmt: skip
    return save_figure(fig, Path(__file__).resolve().parent / "method.png")


if __name__ == "__main__":
    print(main())
