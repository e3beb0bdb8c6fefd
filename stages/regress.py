"""Stage `regress`: geometry vs leakage for one condition (METHODS.md S1) and the study's figures.

    python stages/regress.py --condition base --eval data/eval/base --centroids data/centroids/base \
        --tokenizer models/base --metrics metrics/regress_base.json --plots plots/base --figures figures/base

Per layer, the cosine of each source's centroid to the reference persona's (centered over the
panel) vs the source's own fire rate: the whole statistics suite (personaspace.regress), plus the
matrix analyses (all N(N-1) off-diagonal cells at the primary layer). Writes the metrics for
`dvc metrics`, plot data for `dvc plots` (scatter, rho by layer, rates, the rate matrix) and the
figures as PNG and PDF: rate-matrix heatmap, cosine-vs-rate scatter, rho by layer, rates forest.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from personaspace import plots
from personaspace.assemble import cosine_grid, rate_grid, regression_table
from personaspace.config import load_params
from personaspace.io import atomic_path, write_json
from personaspace.models import load_tokenizer
from personaspace.personas import load_catalog
from personaspace.regress import regress_table, settings_from_params
from personaspace.stats.gates import off_diagonal
from personaspace.tracking import stage_run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--condition", required=True)
    parser.add_argument("--eval", type=Path, required=True, help="the eval stage's folder")
    parser.add_argument("--centroids", type=Path, required=True, help="the centroids stage's folder")
    parser.add_argument("--tokenizer", type=Path, required=True, help="model folder (prompt lengths, BPE baseline)")
    parser.add_argument("--metrics", type=Path, required=True)
    parser.add_argument("--plots", type=Path, required=True, help="folder for plot data (CSV)")
    parser.add_argument("--figures", type=Path, required=True, help="folder for PNG + PDF figures")
    args = parser.parse_args()
    params = load_params(args.params)
    tokenizer = load_tokenizer(args.tokenizer)
    rates = pd.read_parquet(args.eval / "rates.parquet")
    cosines = pd.read_parquet(args.centroids / "cosines.parquet")
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
    layer = metrics["layers"][str(primary)]
    headline = {
        "primary_spearman_rho": layer["spearman"]["rho"], "primary_spearman_p": layer["spearman"]["p"],
        "primary_pearson_r": layer["pearson"]["r"], "n_personas": metrics["n_personas"],
    }  # fmt: skip
    with stage_run("regress", {"condition": args.condition, "personas": len(params.panel), "primary_layer": primary}):
        import mlflow

        with atomic_path(args.plots) as tmp:
            tmp.mkdir()
            for name, frame in plot_data.items():
                frame.to_csv(tmp / f"{name}.csv", index=False)
            matrix = grid.reset_index().melt(id_vars="source", var_name="persona", value_name="rate")
            matrix.to_csv(tmp / "rate_matrix.csv", index=False)
        with atomic_path(args.figures) as tmp:
            tmp.mkdir()
            plots.rate_heatmap(grid, tmp / "rate_matrix", title=f"Fire rate ({args.condition}): source x eval persona")
            plots.hero_scatter(plot_data["scatter"], tmp / "scatter", primary, reference)
            plots.rho_by_layer(
                plot_data["rho_by_layer"], tmp / "rho_by_layer", metrics["n_personas"], params.stats.alpha
            )
            plots.forest_plot(plot_data["rates"], tmp / "rates_forest")
        write_json(metrics, args.metrics)
        mlflow.log_metrics({k: float(v) for k, v in headline.items() if v is not None})
        mlflow.log_artifact(str(args.metrics))
        mlflow.log_artifacts(str(args.figures), artifact_path="figures")
    print(f"{args.condition}: {headline} gates={metrics['gates']['outcome']} -> {args.metrics}")


if __name__ == "__main__":
    main()
