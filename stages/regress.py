"""Stage `regress`: geometry vs leakage for one condition (METHODS.md S1) and the study's figures.

    python stages/regress.py --condition base --eval data/eval/panel/base --centroids data/centroids/panel/raw \
        --tokenizer models/raw --metrics metrics/panel/regress_base.json --plots plots/panel/base \
        --results results/panel/base --figures figures/panel/base

Per layer, the cosine of each source's centroid to the reference persona's (centered over the
panel) vs the source's own fire rate: the whole statistics suite (personaspace.regress), plus the
matrix analyses (all N(N-1) off-diagonal cells at the primary layer). Writes the headline numbers
for `dvc metrics` (--metrics), plot data for `dvc plots` (scatter, rho by layer, rates), every
statistic, the rate matrix and the PDF figures in --results, and the PNG figures (image plots for
`dvc plots diff`) in --figures: rate-matrix heatmap, cosine-vs-rate scatter, rho by layer, rates forest.
"""

from __future__ import annotations

import argparse
from numbers import Real
from pathlib import Path

import personaspace.cpu_kernels  # noqa: F401  (pins the CPU kernels before numpy and torch load: cpu_kernels.py)

import pandas as pd

from personaspace import plots
from personaspace.assemble import cosine_grid, rate_grid, regression_table, undefined_layers
from personaspace.checks import check_stage
from personaspace.config import load_params
from personaspace.io import atomic_path, json_text, write_json
from personaspace.models import load_tokenizer
from personaspace.personas import load_catalog
from personaspace.regress import regress_table, settings_from_params
from personaspace.stats.gates import off_diagonal
from personaspace.tracking import log_to_parent, stage_run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--condition", required=True)
    parser.add_argument("--eval", type=Path, required=True, help="the eval stage's folder")
    parser.add_argument("--centroids", type=Path, required=True, help="the centroids stage's folder")
    parser.add_argument("--tokenizer", type=Path, required=True, help="model folder (prompt lengths, BPE baseline)")
    parser.add_argument("--metrics", type=Path, required=True)
    parser.add_argument("--plots", type=Path, required=True, help="folder for plot data (CSV)")
    parser.add_argument("--results", type=Path, required=True, help="folder for all statistics and the PDF figures")
    parser.add_argument("--figures", type=Path, required=True, help="folder for the PNG figures")
    args = parser.parse_args()
    params = load_params(args.params)
    check_stage(params, needs=("tracking",))  # a stage run alone (`dvc repro -s`) fails here, naming the key and fix
    tokenizer = load_tokenizer(args.tokenizer)
    rates = pd.read_parquet(args.eval / "rates.parquet")
    cosines = pd.read_parquet(args.centroids / "cosines.parquet")
    cosines = cosines[cosines["readout"] == "last_input"].drop(columns="readout")  # S1's readout
    reference = params.stats.reference_persona
    table = regression_table(cosines, rates, load_catalog(), tokenizer, params.panel, reference)
    settings = settings_from_params(
        params.stats, seed=params.seed, primary_layer=params.regress.primary_layer,
        calibration=params.regress.calibration, tokenizer=tokenizer,
    )  # fmt: skip
    metrics, plot_data = regress_table(table, settings)
    primary = metrics["primary_layer"]
    grid = rate_grid(rates)
    metrics["off_diagonal"] = off_diagonal(
        grid, cosine_grid(cosines, primary).loc[grid.index, grid.columns], params.stats.strong_emitter_min_rate
    )
    metrics["condition"] = args.condition
    metrics["excluded_layers"] = undefined_layers(cosines)
    metrics["excluded_layers_reason"] = "centered cosine undefined: every persona's centroid is the same vector there"
    headline = headline_metrics(metrics)
    with stage_run(
        "regress",
        {"condition": args.condition, "personas": len(params.panel), "primary_layer": primary},
        study=params.study.name,
    ):
        import mlflow

        with atomic_path(args.plots) as tmp:
            tmp.mkdir()
            for name, frame in plot_data.items():
                frame.to_csv(tmp / f"{name}.csv", index=False)
        with atomic_path(args.results) as results, atomic_path(args.figures) as figures:
            results.mkdir()
            figures.mkdir()
            (results / "regress.json").write_text(json_text(metrics))
            grid.to_csv(results / "rate_matrix.csv")
            title = f"Fire rate ({args.condition}): source x eval persona"
            drawn = [
                *plots.rate_heatmap(grid, results / "rate_matrix", title=title),
                *plots.hero_scatter(plot_data["scatter"], results / "scatter", primary, reference),
                *plots.rho_by_layer(plot_data["rho_by_layer"], results / "rho_by_layer", metrics["n_personas"],
                                    params.stats.alpha),
                *plots.forest_plot(plot_data["rates"], results / "rates_forest"),
            ]  # fmt: skip
            for path in drawn:
                if path.suffix == ".png":
                    path.rename(figures / path.name)
        write_json(headline, args.metrics)
        flat = pd.json_normalize(headline).iloc[0].to_dict()
        flat = {k: v for k, v in flat.items() if isinstance(v, Real) and not isinstance(v, bool) and v == v}
        mlflow.log_metrics(flat)
        log_to_parent(flat, {"personas": len(params.panel), "model": params.model})
        mlflow.log_artifacts(str(args.results), artifact_path="results")
        mlflow.log_artifacts(str(args.figures), artifact_path="figures")
    print(f"{args.condition}: {json_text(headline)}")


def headline_metrics(metrics: dict) -> dict:
    """The numbers `dvc metrics diff` compares across panels; everything else is in regress.json.

    Keys are unique across the metrics files (the fire rates are eval's), so `dvc exp show` needs
    no file prefixes to tell its columns apart.
    """
    primary = metrics["primary_layer"]
    layer = metrics["layers"][str(primary)]
    by_rho = {k: v["spearman"]["rho"] for k, v in metrics["layers"].items() if v["spearman"]["rho"] is not None}
    best = max(by_rho, key=lambda k: abs(by_rho[k])) if by_rho else None
    return {
        "n_personas": metrics["n_personas"],
        "primary": {
            "layer": primary, "spearman_rho": layer["spearman"]["rho"], "spearman_p": layer["spearman"]["p"],
            "holm_p": layer["holm"].get("spearman_p"), "pearson_r": layer["pearson"]["r"],
            "pearson_p": layer["pearson"]["p"],
        },
        "strongest_layer": {"layer": int(best) if best else None, "spearman_rho": by_rho.get(best) if best else None},
        "off_diagonal": {k: metrics["off_diagonal"]["all"][k] for k in ("rho", "p", "n_cells")},
        "gates_outcome": metrics["gates"]["outcome"],
    }  # fmt: skip


if __name__ == "__main__":
    main()
