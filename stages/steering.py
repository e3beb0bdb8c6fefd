"""Stage `steering` (S4): one condition's steering vectors, iso-random controls and calibrated coefficients.

    python stages/steering.py --condition base --model models/raw --centroids data/centroids/train_steering/raw \
        --markers data/markers/base/ds1a2b3c4d --out data/steering/train_steering/base

From the base's centroids (`train_steering.readout`) at the study's two steering layers, for every
eval persona: the vector (raw or centered over the eval personas), its norm, a norm-matched
isotropic Gaussian control seeded from stable ids, and c_train = `calibration_ratio` x mean ||h_L|| /
||v||, mean ||h_L|| measured on the base over every row of the condition's marker datasets as the
primary arm trains them (neutral prompt). Writes `vectors.npz` and `steering.json` (the numbers).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import personaspace.cpu_kernels  # noqa: F401  (pins the CPU kernels before numpy and torch load: cpu_kernels.py)

import numpy as np
import pandas as pd

from personaspace.checks import check_stage
from personaspace.config import ParamsError, load_params
from personaspace.io import atomic_path, json_text
from personaspace.models import load_model
from personaspace.steering import mean_hidden_norm, steering_artifacts
from personaspace.study import StudyError, check_train_steering
from personaspace.tracking import stage_run
from personaspace.train import tokenize_marker_dataset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--condition", required=True)
    parser.add_argument("--model", type=Path, required=True, help="the condition's pretrained base")
    parser.add_argument("--centroids", type=Path, required=True, help="the base's centroids stage output")
    parser.add_argument("--markers", type=Path, required=True, help="the condition's marker datasets")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    params = load_params(args.params)
    check_stage(
        params, needs=("device", "tracking")
    )  # a stage run alone (`dvc repro -s`) fails here, naming the key and fix
    try:
        cfg = check_train_steering(params.study, params.seed)
    except StudyError as exc:
        raise ParamsError(f"study.{exc}") from exc
    layers = [cfg.layer, cfg.contrast_layer]
    with np.load(args.centroids / "centroids.npz") as data:
        if cfg.readout not in data:
            raise ParamsError(f"study.train_steering.readout: {cfg.readout!r} is not in {args.centroids}; "
                              "add it to probes.readouts")  # fmt: skip
        read_at = data["layers"].tolist()
        missing = [layer for layer in layers if layer not in read_at]
        if missing:
            raise ParamsError(f"study.train_steering: layers {missing} were not read by the centroids stage; "
                              "add them to probes.layers")  # fmt: skip
        order = data["personas"].tolist()
        centroid = data[cfg.readout][:, [read_at.index(layer) for layer in layers]]
    files = sorted(args.markers.glob("*.parquet"))
    if not files:
        raise ParamsError(f"no marker datasets in {args.markers}; run `dvc repro markers` first")
    rows = pd.concat([pd.read_parquet(f) for f in files], ignore_index=True)
    rows = rows.drop_duplicates(["persona", "question_id", "sample_idx", "completion"])  # negatives shared by sources
    model, tokenizer = load_model(args.model, device=params.generation.device, dtype=params.generation.dtype)
    dataset = tokenize_marker_dataset(tokenizer, rows, "completion", params.marker, params.marker_separator,
                                      max_length=1 << 30, system_prompt=cfg.neutral_prompt)  # fmt: skip
    run_params = {"condition": args.condition, "readout": cfg.readout, "centering": cfg.centering,
                  "layers": ",".join(map(str, layers)), "ratio": cfg.calibration_ratio, "rows": len(rows)}  # fmt: skip
    with stage_run("steering", run_params, tags={"condition": args.condition}, study=params.study.name):
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        hidden_norm = mean_hidden_norm(model, dataset["input_ids"], layers, params.generation.batch_size, pad)
        out = steering_artifacts(order, centroid, layers, params.study.eval_personas, cfg.centering, hidden_norm,
                                 cfg.calibration_ratio, params.seed, args.condition)  # fmt: skip
        summary = {
            "condition": args.condition, "base": args.model.name, "readout": cfg.readout, "centering": cfg.centering,
            "layers": layers, "calibration_ratio": cfg.calibration_ratio, "rows_measured": len(rows),
            "mean_hidden_norm": dict(zip(map(str, layers), out["hidden_norm"].tolist(), strict=True)),
            "personas": {
                p: {str(layer): {"norm": float(out["norm"][i, j]), "coef": float(out["coef"][i, j])}
                    for j, layer in enumerate(layers)}
                for i, p in enumerate(order)
            },
        }  # fmt: skip
        import mlflow

        mlflow.log_metrics({f"mean_hidden_norm_L{k}": v for k, v in zip(layers, out["hidden_norm"], strict=True)})
        with atomic_path(args.out) as tmp:
            tmp.mkdir()
            np.savez(tmp / "vectors.npz", personas=np.array(order), layers=np.array(layers),
                     centroid=out["centroid"], iso_random=out["iso_random"], norm=out["norm"], coef=out["coef"],
                     hidden_norm=out["hidden_norm"])  # fmt: skip
            (tmp / "steering.json").write_text(json_text(summary))
    print(json.dumps({"condition": args.condition, "layers": layers, "mean_hidden_norm": summary["mean_hidden_norm"]}))


if __name__ == "__main__":
    main()
