"""Stage `centroids`: persona centroids of one pretrained base, per readout and layer, and their cosines.

    python stages/centroids.py --model models/raw --out data/centroids/panel/raw

For every eval persona of the study (S1: the panel) x eval question, the readouts of
`probes.readouts` at `probes.layers` (personaspace.probes); the response readouts first sample one
answer per (persona, question) from this base, with eval's sampling settings and a seed from
stable ids. Centroid = mean over questions. Writes:

- `centroids.npz`: one array (personas x layers x hidden) per readout, with the persona order,
  the hidden-state index of each layer and the layer convention;
- `states.npz`: the per-question readouts behind them (what a bootstrap over questions resamples);
- `cosines.parquet`: every persona pair, readout and layer, raw and centered over the study's eval
  personas, the bank named (`panel<N>` when they are the panel);
- `responses.parquet`: the sampled answers (response readouts only), a completions table;
- `readout.json`: what was read, where.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import personaspace.cpu_kernels  # noqa: F401  (pins the CPU kernels before numpy and torch load: cpu_kernels.py)

import numpy as np
import pandas as pd

from personaspace.checks import check_stage
from personaspace.completions import sample_persona_completions, system_message
from personaspace.config import Params, ParamsError, load_params
from personaspace.distributed import finish, launch
from personaspace.generate import Sampling, hf_generator
from personaspace.io import atomic_path
from personaspace.models import load_model, render_prompt
from personaspace.personas import load_catalog
from personaspace.probes import RESPONSE_READOUTS, centroids, cosine_table, readout_states
from personaspace.tracking import stage_run

LAYER_CONVENTION = "index 0 = embedding output; index k = output of decoder block k (transformers hidden_states[k])"


def centering_bank_name(params: Params) -> str:
    """The name of the bank centered cosines subtract: `panel<N>` for the panel, else the study's eval personas."""
    personas = params.study.eval_personas
    return f"panel{len(personas)}" if personas == params.panel else f"{params.study.name}_eval_personas"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    params = load_params(args.params)
    check_stage(
        params, needs=("device", "tracking")
    )  # a stage run alone (`dvc repro -s`) fails here, naming the key and fix
    catalog = load_catalog()
    ranks = launch(params.parallel.processes, params.generation.device)  # batches dealt to the GPUs
    model, tokenizer = load_model(args.model, device=ranks.device(params.generation.device),
                                  dtype=params.generation.dtype)  # fmt: skip
    blocks = model.config.num_hidden_layers
    layers = params.probes.layers
    if layers is not None and layers[-1] > blocks:
        raise ParamsError(f"probes.layers: {layers[-1]} is past this model's last layer ({blocks} blocks); drop it")
    layer_index = list(range(blocks + 1)) if layers is None else list(layers)
    personas, readouts = params.study.eval_personas, params.probes.readouts
    base = args.model.name
    run_params = {"base": base, "personas": len(personas), "readouts": ",".join(readouts), "layers": len(layer_index)}
    with stage_run("centroids", run_params, tags={"base": base}, study=params.study.name, ranks=ranks):
        table = _prompts(params, catalog, model, tokenizer, base, ranks)
        responses = list(table["text"]) if "text" in table else None
        states = readout_states(model, tokenizer, list(table["prompt"]), responses, readouts, layers,
                                params.generation.batch_size, ranks)  # fmt: skip
        if not ranks.main:  # every rank holds all the states; rank 0 writes
            return finish(ranks)
        bank = centering_bank_name(params)
        cents, frames = {}, []
        for readout, values in states.items():
            order, cents[readout] = centroids(values, list(table["persona"]))
            frames.append(cosine_table(order, cents[readout], personas, bank, layer_index).assign(readout=readout))
        with atomic_path(args.out) as tmp:
            tmp.mkdir()
            np.savez(tmp / "centroids.npz", **cents, personas=np.array(order), layers=np.array(layer_index),
                     layer_convention=LAYER_CONVENTION, base=base)  # fmt: skip
            np.savez(tmp / "states.npz", **states, persona=table["persona"].to_numpy(dtype=str),
                     question_id=table["question_id"].to_numpy(dtype=str), layers=np.array(layer_index))  # fmt: skip
            pd.concat(frames, ignore_index=True).to_parquet(tmp / "cosines.parquet", index=False)
            if responses is not None:
                table.drop(columns="prompt").to_parquet(tmp / "responses.parquet", index=False)
            (tmp / "readout.json").write_text(json.dumps({
                "readouts": list(readouts), "layer_convention": LAYER_CONVENTION, "layers": layer_index,
                "personas": order, "questions": len(catalog.questions("eval")), "centering_bank": bank,
            }, indent=2) + "\n")  # fmt: skip
    print(f"{len(order)} centroids x {len(layer_index)} layers x {len(readouts)} readouts -> {args.out}")
    finish(ranks)


def _prompts(params: Params, catalog, model, tokenizer, base: str, ranks) -> pd.DataFrame:
    """One row per (eval persona, eval question): the rendered prompt and, for response readouts, a sampled answer."""
    ev = params.eval
    if set(RESPONSE_READOUTS) & set(params.probes.readouts):
        generator = hf_generator(model, tokenizer, batch_size=params.generation.batch_size, ranks=ranks)
        table = pd.concat([
            sample_persona_completions(
                generator, tokenizer, catalog, persona, bank="eval", samples_per_question=1,
                sampling=Sampling(ev.temperature, ev.top_p, ev.max_new_tokens), user_suffix=ev.user_suffix,
                study_seed=params.seed, condition=base, marker=params.marker, stage="probes",
            )
            for persona in params.study.eval_personas
        ], ignore_index=True)  # fmt: skip
    else:
        table = pd.DataFrame([
            {"persona": persona, "question_id": q.id,
             "system_prompt": system_message(catalog.persona(persona), tokenizer), "user": q.text + ev.user_suffix}
            for persona in params.study.eval_personas for q in catalog.questions("eval")
        ])  # fmt: skip
    prompts = [render_prompt(tokenizer, s if isinstance(s, str) else None, u)
               for s, u in zip(table["system_prompt"], table["user"], strict=True)]  # fmt: skip
    return table.assign(prompt=prompts)


if __name__ == "__main__":
    main()
