"""Stage `centroids`: persona centroids of one pretrained base at every layer, and their cosines.

    python stages/centroids.py --model models/raw --out data/centroids/raw

Readout `last_input` (the assistant-start position) for every panel persona x eval question;
centroid = mean over questions. Writes `centroids.npz` (array personas x (layers + 1) x hidden,
persona order, layer convention) and `cosines.parquet` (every persona pair and layer, raw and
centered over the panel, the bank named `panel<N>`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from personaspace.completions import system_message
from personaspace.config import load_params
from personaspace.distributed import finish, launch
from personaspace.io import atomic_path
from personaspace.models import load_model, render_prompt
from personaspace.personas import load_catalog
from personaspace.probes import centroids, cosine_table, last_input_states
from personaspace.tracking import stage_run

LAYER_CONVENTION = "index 0 = embedding output; index k = output of decoder block k (transformers hidden_states[k])"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    params = load_params(args.params)
    catalog = load_catalog()
    ranks = launch(params.parallel.processes, params.generation.device)  # batches dealt to the GPUs
    model, tokenizer = load_model(args.model, device=ranks.device(params.generation.device),
                                  dtype=params.generation.dtype)  # fmt: skip
    prompts, labels = [], []
    for persona in params.panel:
        system = system_message(catalog.persona(persona), tokenizer)
        for question in catalog.questions("eval"):
            prompts.append(render_prompt(tokenizer, system, question.text + params.eval.user_suffix))
            labels.append(persona)
    run_params = {"base": args.model.name, "personas": len(params.panel), "readout": "last_input"}
    with stage_run("centroids", run_params, tags={"base": args.model.name}, study=params.study.name, ranks=ranks):
        states = last_input_states(model, tokenizer, prompts, params.generation.batch_size, ranks)
        if not ranks.main:  # every rank holds all the states; rank 0 writes
            return finish(ranks)
        order, cents = centroids(states, labels)
        bank = f"panel{len(params.panel)}"
        cosines = cosine_table(order, cents, params.panel, bank)
        with atomic_path(args.out) as tmp:
            tmp.mkdir()
            np.savez(tmp / "centroids.npz", centroids=cents, personas=np.array(order), readout="last_input",
                     layer_convention=LAYER_CONVENTION, base=args.model.name)  # fmt: skip
            cosines.to_parquet(tmp / "cosines.parquet", index=False)
            (tmp / "readout.json").write_text(json.dumps({
                "readout": "last_input", "layer_convention": LAYER_CONVENTION, "layers": int(cents.shape[1]),
                "personas": order, "questions": len(catalog.questions("eval")), "centering_bank": bank,
            }, indent=2) + "\n")  # fmt: skip
    print(f"{len(order)} centroids x {cents.shape[1]} layers -> {args.out}")
    finish(ranks)


if __name__ == "__main__":
    main()
