"""Figures from tidy tables (matplotlib, Agg): each function takes a table and writes PNG + PDF.

>>> forest_plot(rates_table, Path("plots/forest"))   # writes plots/forest.png and .pdf  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Callable
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
    """Heatmap of a source x eval-persona rate matrix, values annotated when it is small enough to read, each
    source's own cell (row and column of the same persona: the source rate) outlined."""
    from matplotlib.patches import Rectangle

    fig, ax = plt.subplots(figsize=(0.45 * len(matrix.columns) + 3, 0.45 * len(matrix.index) + 2))
    image = ax.imshow(matrix.to_numpy(float), vmin=0, vmax=1, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(matrix.columns)), matrix.columns, rotation=90)
    ax.set_yticks(range(len(matrix.index)), matrix.index)
    columns = list(matrix.columns)
    for i, source in enumerate(matrix.index):
        if source in columns:
            j = columns.index(source)
            ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="red", lw=1.5))
    ax.set_xlabel("eval persona (outlined: the source's own persona)")
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
    """Cosine to the reference vs own fire rate: Wilson error bars, OLS fit and prediction band (cut at the
    rates' range, 0 to 1), persona labels moved apart by adjustText (seeded: the same figure every run)."""
    from adjustText import adjust_text

    scatter = scatter.sort_values("cosine")
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    ax.fill_between(
        scatter["cosine"], scatter["pi_low"].clip(0, 1), scatter["pi_high"].clip(0, 1), alpha=0.15,
        label="95% prediction interval",
    )  # fmt: skip
    ax.plot(scatter["cosine"], scatter["predicted"].clip(0, 1), color="black", lw=1, label="OLS fit")
    for category, part in scatter.groupby("category"):
        err = np.vstack([part["rate"] - part["wilson_low"], part["wilson_high"] - part["rate"]])
        ax.errorbar(part["cosine"], part["rate"], yerr=err, fmt="o", capsize=2, label=category)
    ax.set_ylim(-0.05, 1.05)
    labels = [
        ax.text(x, y, name, fontsize=6) for x, y, name in scatter[["cosine", "rate", "persona"]].itertuples(False)
    ]
    adjust_text(
        labels, x=scatter["cosine"].to_numpy(), y=scatter["rate"].to_numpy(), ax=ax,
        arrowprops={"arrowstyle": "-", "color": "grey", "lw": 0.5},
    )  # fmt: skip
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


def condition_rates(
    table: pd.DataFrame, stem: Path, title: str = "Bystander pool fire rate by condition"
) -> list[Path]:
    """S2: pooled bystander rate per condition with Wilson CIs; the pre-coupling baseline rate as an x where given."""
    x = np.arange(len(table))
    rate = table["rate"].astype(float)
    fig, ax = plt.subplots(figsize=(1.1 * len(table) + 2.5, 3.8))
    ax.errorbar(x, rate, yerr=[rate - table["wilson_low"].astype(float), table["wilson_high"].astype(float) - rate],
                fmt="o", capsize=3, label="coupled (Wilson CI)")  # fmt: skip
    baseline = pd.to_numeric(table.get("baseline_rate", pd.Series(np.nan, index=table.index)), errors="coerce")
    if baseline.notna().any():
        ax.scatter(x, baseline, marker="x", color="C3", label="pre-coupling baseline of its base", zorder=3)
    labels = [
        f"{c}\n({p}, n={int(n)})" for c, p, n in zip(table["condition"], table["pretrained"], table["n"], strict=True)
    ]
    ax.set_xticks(x, labels, fontsize=7)
    ax.set_ylim(0, 1)
    ax.set_ylabel("bystander fire rate")
    ax.set_title(title)
    ax.legend(fontsize=7)
    return _save(fig, stem)


def condition_persona_forest(
    table: pd.DataFrame, stem: Path, title: str = "Fire rate by persona and condition"
) -> list[Path]:
    """S2: per-persona rates with Wilson CIs, one marker per condition (rows in the table's persona order)."""
    personas = list(dict.fromkeys(table["persona"]))
    conditions = list(dict.fromkeys(table["condition"]))
    roles = table.drop_duplicates("persona").set_index("persona")["role"]
    fig, ax = plt.subplots(figsize=(6.5, 0.45 * len(personas) + 1.5))
    step = 0.7 / max(len(conditions), 1)
    for k, condition in enumerate(conditions):
        part = table[table["condition"] == condition].set_index("persona").reindex(personas)
        y = np.arange(len(personas)) + (k - (len(conditions) - 1) / 2) * step
        rate = part["rate"].astype(float)
        err = [rate - part["wilson_low"].astype(float), part["wilson_high"].astype(float) - rate]
        ax.errorbar(rate, y, xerr=err, fmt="o", ms=3, capsize=2, label=condition)
    ax.set_yticks(np.arange(len(personas)), [f"{p} [{roles[p]}]" for p in personas], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("fire rate (Wilson CI)")
    ax.set_title(title)
    # beside the axes: inside, it covered the last personas' rows (seen in em_first's laptop report)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    return _save(fig, stem)


def completion_lengths(table: pd.DataFrame, stem: Path, title: str = "Completion length by condition") -> list[Path]:
    """S2: each (persona, question) cell's mean completion tokens per condition (box plot), n-weighted mean as a dot."""
    conditions = list(dict.fromkeys(table["condition"]))
    groups = [table[table["condition"] == c] for c in conditions]
    fig, ax = plt.subplots(figsize=(1.1 * len(conditions) + 2.5, 3.8))
    ax.boxplot([g["mean_tokens"].astype(float) for g in groups], tick_labels=conditions, showfliers=True)
    weighted = [float((g["mean_tokens"] * g["n"]).sum() / g["n"].sum()) for g in groups]
    ax.scatter(np.arange(1, len(conditions) + 1), weighted, color="C3", zorder=3, label="mean over completions")
    ax.set_ylabel("completion tokens (cell means)")
    ax.set_title(title)
    ax.legend(fontsize=7)
    return _save(fig, stem)


def contrast_forest(table: pd.DataFrame, stem: Path, title: str = "Bystander rate contrasts") -> list[Path]:
    """S2: each contrast's delta with its headline CI, its pre-registered threshold as a tick; filled when it passes."""
    y = np.arange(len(table))
    delta = table["delta"].astype(float)
    low = pd.to_numeric(table["ci_low"], errors="coerce")
    high = pd.to_numeric(table["ci_high"], errors="coerce")
    fig, ax = plt.subplots(figsize=(6, 0.6 * len(table) + 1.5))
    ax.errorbar(delta, y, xerr=[(delta - low).fillna(0), (high - delta).fillna(0)], fmt="none", capsize=3, color="C0")
    passes = table["passes"].astype(bool).to_numpy()
    ax.scatter(delta, y, facecolors=np.where(passes, "C0", "white"), edgecolors="C0", zorder=3)
    ax.scatter(table["threshold"].astype(float), y, marker="|", s=200, color="C3", label="threshold")
    ax.axvline(0, color="black", lw=0.5)
    labels = [
        f"{c}: {t} - {k}" for c, t, k in zip(table["contrast"], table["treatment"], table["control"], strict=True)
    ]
    ax.set_yticks(y, labels, fontsize=7)
    ax.invert_yaxis()
    net = "baseline_subtracted" in table and table["baseline_subtracted"].astype(bool).all()
    ax.set_xlabel("difference in bystander fire rate" + (", net of pre-coupling baselines" if net else "") + " (CI)")
    ax.set_title(title)
    ax.legend(fontsize=7)
    return _save(fig, stem)


def em_first_figures(tables: dict[str, pd.DataFrame], folder: Path) -> list[Path]:
    """S2's figures from ``analyze_em_first``'s plot tables (the stage and `personaspace analyze` share it)."""
    folder = Path(folder)
    paths = condition_rates(tables["bystander_rates"], folder / "bystander_rates")
    paths += condition_persona_forest(tables["persona_rates"], folder / "persona_forest")
    paths += contrast_forest(tables["contrasts"], folder / "contrasts")
    if "completion_length" in tables:
        paths += completion_lengths(tables["completion_length"], folder / "completion_length")
    return paths


def geometric_by_layer(table: pd.DataFrame, stem: Path) -> list[Path]:
    """S3's geometric delta per layer with its bootstrap interval (0 marked)."""
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    err = [table["delta"] - table["ci_low"], table["ci_high"] - table["delta"]]
    ax.errorbar(table["layer"], table["delta"], yerr=err, fmt="o-", capsize=3)
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xlabel("layer (hidden-state index)")
    ax.set_ylabel("cosine delta, C2 base - C1 base")
    ax.set_title("Source-bystander cosine change by layer")
    return _save(fig, stem)


def rates_by_condition_and_recipe(table: pd.DataFrame, stem: Path) -> list[Path]:
    """Bystander pool rate per condition, one group of bars per recipe, Wilson intervals."""
    recipes, conditions = list(dict.fromkeys(table["recipe"])), list(dict.fromkeys(table["condition"]))
    width = 0.8 / len(conditions)
    fig, ax = plt.subplots(figsize=(1.6 * len(recipes) + 2.5, 3.5))
    for i, condition in enumerate(conditions):
        part = table[table["condition"] == condition].set_index("recipe").reindex(recipes)
        x = np.arange(len(recipes)) + (i - (len(conditions) - 1) / 2) * width
        err = [part["rate"] - part["ci_low"], part["ci_high"] - part["rate"]]
        ax.bar(x, part["rate"], width, yerr=err, capsize=2, label=condition)
    ax.set_xticks(range(len(recipes)), recipes)
    ax.set_ylim(0, 1)
    ax.set_ylabel("bystander fire rate")
    ax.legend(title="condition")
    ax.set_title("Bystander leakage per condition and recipe")
    return _save(fig, stem)


def joint_probe_figures(tables: dict[str, pd.DataFrame], folder: Path) -> list[Path]:
    """S3's figures from ``analyze_joint_probe``'s plot tables (the stage and `personaspace analyze` share it)."""
    folder = Path(folder)
    paths = geometric_by_layer(tables["geometric_by_layer"], folder / "geometric_by_layer")
    return paths + rates_by_condition_and_recipe(tables["bystander_rates"], folder / "bystander_rates")


def steered_vs_prompted(table: pd.DataFrame, stem: Path) -> list[Path]:
    """S4: each persona's steered fire rate against its prompted rate (arm C), one panel per arm, one colour per coef."""
    arms = list(dict.fromkeys(table["arm"]))
    fig, axes = plt.subplots(1, len(arms), figsize=(3.2 * len(arms), 3.4), squeeze=False, sharey=True)
    for ax, arm in zip(axes[0], arms, strict=True):
        part = table[table["arm"] == arm]
        for i, (coef, group) in enumerate(part.groupby("coef", sort=False)):
            ax.scatter(group["prompted_rate"], group["steered_rate"], color=f"C{i}", label=f"c = {coef}", s=18)
        ax.plot([0, 1], [0, 1], color="grey", lw=0.6)
        ax.set_xlim(-0.03, 1.03)
        ax.set_ylim(-0.03, 1.03)
        ax.set_title(f"arm {arm}")
        ax.set_xlabel("prompted rate (arm C)")
    axes[0][0].set_ylabel("steered rate (neutral prompt)")
    axes[0][-1].legend(fontsize=7)
    return _save(fig, stem)


def rho_by_arm(table: pd.DataFrame, stem: Path, pass_rho: float) -> list[Path]:
    """S4: Spearman rho (steered vs prompted) with its interval per arm and coef; the pass threshold marked."""
    labels = [f"{a} / c = {c}" for a, c in zip(table["arm"], table["coef"], strict=True)]
    y = np.arange(len(table))
    rho = pd.to_numeric(table["rho"], errors="coerce")
    low, high = pd.to_numeric(table["ci_low"], errors="coerce"), pd.to_numeric(table["ci_high"], errors="coerce")
    fig, ax = plt.subplots(figsize=(5.5, 0.35 * len(table) + 1.5))
    ax.errorbar(rho, y, xerr=[(rho - low).fillna(0), (high - rho).fillna(0)], fmt="o", capsize=3)
    ax.axvline(0, color="black", lw=0.5)
    ax.axvline(pass_rho, color="C3", lw=0.8, ls="--", label=f"pass: rho >= {pass_rho}")
    ax.set_yticks(y, labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlim(-1.05, 1.05)
    ax.set_xlabel("Spearman rho across personas (question-bootstrap interval)")
    ax.legend(fontsize=7)
    return _save(fig, stem)


def train_steering_figures(tables: dict[str, pd.DataFrame], folder: Path, pass_rho: float = 0.6) -> list[Path]:
    """S4's figures from ``analyze_train_steering``'s plot tables (the stage and `personaspace analyze` share it)."""
    folder = Path(folder)
    return steered_vs_prompted(tables["scatter"], folder / "steered_vs_prompted") + rho_by_arm(
        tables["rho"], folder / "rho_by_arm", pass_rho
    )


def write_analysis_outputs(
    tables: dict[str, pd.DataFrame], plots_folder: Path, figures_folder: Path, figures: Callable[..., list[Path]]
) -> None:
    """An analysis stage's plot tables (CSV, for `dvc plots`) and its ``figures`` (PNG + PDF), each folder atomically."""
    with atomic_path(plots_folder) as tmp:
        tmp.mkdir()
        for name, table in tables.items():
            table.to_csv(tmp / f"{name}.csv", index=False)
    with atomic_path(figures_folder) as tmp:
        tmp.mkdir()
        figures(tables, tmp)
