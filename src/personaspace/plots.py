"""Figures from tidy tables (matplotlib, Agg): each function takes a table and writes PNG + PDF.

>>> forest_plot(rates_table, Path("plots/forest"))   # writes plots/forest.png and .pdf  # doctest: +SKIP
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from scipy import stats

from personaspace.io import atomic_path


def _save(fig, stem: Path) -> list[Path]:
    paths = []
    for suffix in (".png", ".pdf"):
        path = stem.with_suffix(suffix)
        with atomic_path(path) as tmp:
            # no creation date in the PDF: the same figure gives the same bytes (DVC hashes results/)
            metadata = {"CreationDate": None} if suffix == ".pdf" else None
            fig.savefig(tmp, format=suffix[1:], dpi=150, bbox_inches="tight", metadata=metadata)
        paths.append(path)
    plt.close(fig)
    return paths


def rate_heatmap(
    matrix: pd.DataFrame, stem: Path, title: str = "Fire rate: source adapter x eval persona"
) -> list[Path]:
    """Heatmap of a source x eval-persona rate matrix, values annotated when it is small enough to read."""
    fig, ax = plt.subplots(figsize=(0.45 * len(matrix.columns) + 3, 0.45 * len(matrix.index) + 2))
    image = ax.imshow(matrix.to_numpy(float), vmin=0, vmax=1, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(matrix.columns)), matrix.columns, rotation=90)
    ax.set_yticks(range(len(matrix.index)), matrix.index)
    ax.set_xlabel("eval persona")
    ax.set_ylabel("source (adapter)")
    if matrix.size <= 24 * 24:
        for (i, j), value in np.ndenumerate(matrix.to_numpy(float)):
            ax.text(
                j, i, f"{value:.2f}", ha="center", va="center", fontsize=6, color="white" if value < 0.5 else "black"
            )
    fig.colorbar(image, ax=ax, label="fire rate")
    ax.set_title(title)
    return _save(fig, stem)


def hero_scatter(scatter: pd.DataFrame, stem: Path, layer: int, reference: str) -> list[Path]:
    """Cosine to the reference vs own fire rate: Wilson error bars, OLS fit and prediction band."""
    scatter = scatter.sort_values("cosine")
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    ax.fill_between(
        scatter["cosine"], scatter["pi_low"], scatter["pi_high"], alpha=0.15, label="95% prediction interval"
    )
    ax.plot(scatter["cosine"], scatter["predicted"], color="black", lw=1, label="OLS fit")
    for category, part in scatter.groupby("category"):
        err = np.vstack([part["rate"] - part["wilson_low"], part["wilson_high"] - part["rate"]])
        ax.errorbar(part["cosine"], part["rate"], yerr=err, fmt="o", capsize=2, label=category)
    for _, row in scatter.iterrows():
        ax.annotate(row["persona"], (row["cosine"], row["rate"]), fontsize=6, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel(f"cosine to {reference} centroid (layer {layer})")
    ax.set_ylabel("source fire rate (Wilson 95% CI)")
    ax.legend(fontsize=7)
    return _save(fig, stem)


def rho_by_layer(by_layer: pd.DataFrame, stem: Path, n: int, alpha: float) -> list[Path]:
    """Spearman rho by layer; filled where the Holm-adjusted p < alpha; the first Holm step's critical rho."""
    by_layer = by_layer.sort_values("layer")
    fig, ax = plt.subplots(figsize=(6.5, 3.5))
    ax.plot(by_layer["layer"], by_layer["spearman_rho"], color="grey", lw=1)
    significant = by_layer["holm_p"].fillna(1) < alpha
    ax.scatter(
        by_layer["layer"], by_layer["spearman_rho"], facecolors=np.where(significant, "C0", "white"), edgecolors="C0"
    )
    k = len(by_layer)
    if n > 3:
        t = stats.t.isf(alpha / k / 2, n - 2)
        critical = t / np.sqrt(n - 2 + t**2)
        for sign in (1, -1):
            ax.axhline(sign * critical, ls="--", lw=0.8, color="C3")
        ax.text(by_layer["layer"].min(), critical, f" Holm first step (alpha/{k})", color="C3", fontsize=7, va="bottom")
    ax.axhline(0, color="black", lw=0.5)
    ax.set_xlabel("layer (0 = embedding output)")
    ax.set_ylabel("Spearman rho (cosine vs fire rate)")
    return _save(fig, stem)


def forest_plot(rates: pd.DataFrame, stem: Path, title: str = "Fire rate by persona") -> list[Path]:
    """Per-persona rates with Wilson 95% CIs, one row each."""
    rates = rates.sort_values("rate")
    fig, ax = plt.subplots(figsize=(5.5, 0.25 * len(rates) + 1.5))
    y = np.arange(len(rates))
    ax.errorbar(rates["rate"], y, xerr=[rates["rate"] - rates["wilson_low"], rates["wilson_high"] - rates["rate"]],
                fmt="o", capsize=2)  # fmt: skip
    ax.set_yticks(y, [f"{p} (n={int(n)})" for p, n in zip(rates["persona"], rates["n"], strict=True)], fontsize=7)
    ax.set_xlim(0, 1)
    ax.set_xlabel("fire rate (Wilson 95% CI)")
    ax.set_title(title)
    return _save(fig, stem)
