"""PNG heatmap of the CKA matrix with the segment boundaries and the removed blocks marked (for humans)."""
from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np


def save_cka_heatmap(path: str | os.PathLike, cka: np.ndarray, segments: Sequence[Sequence[int]],
                     removed: Sequence[int] = (), title: str = "") -> None:
    """Write ``path`` (PNG): CKA in [0, 1] colours, white lines between segments, removed blocks crossed."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt  # noqa: PLC0415

    cka = np.asarray(cka, dtype=np.float64)
    L = cka.shape[0]
    fig, ax = plt.subplots(figsize=(6.4, 5.6), dpi=110)
    try:
        im = ax.imshow(cka, cmap="viridis", vmin=min(0.0, float(cka.min())), vmax=1.0, origin="upper",
                       interpolation="nearest")
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="CKA")
        for _, b in list(segments)[:-1]:
            edge = b + 0.5
            ax.axhline(edge, color="white", lw=1.5)
            ax.axvline(edge, color="white", lw=1.5)
        for a, b in segments:  # outline each segment's diagonal block
            ax.add_patch(plt.Rectangle((a - 0.5, a - 0.5), b - a + 1, b - a + 1, fill=False, ec="white", lw=2))
        if len(removed):
            r = np.asarray(removed)
            ax.scatter(r, r, marker="x", s=60, c="red", linewidths=2, label="removed block", zorder=3)
            ax.legend(loc="upper right", fontsize=8, framealpha=0.8)
        step = max(1, L // 15)
        ticks = list(range(0, L, step))
        removed_set = {int(i) for i in removed}
        for set_ticks, set_labels, get_labels in ((ax.set_xticks, ax.set_xticklabels, ax.get_xticklabels),
                                                  (ax.set_yticks, ax.set_yticklabels, ax.get_yticklabels)):
            set_ticks(ticks)
            set_labels([str(t) for t in ticks], fontsize=7)
            for t, lab in zip(ticks, get_labels()):
                if t in removed_set:
                    lab.set_color("red")
        ax.set_xlabel("block")
        ax.set_ylabel("block")
        ax.set_title(title or f"CKA of block outputs, {len(segments)} segments, {len(removed)} removed",
                     fontsize=10)
        fig.tight_layout()
        fig.savefig(os.fspath(path), format="png")
    finally:
        plt.close(fig)
