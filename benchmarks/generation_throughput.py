"""Generation throughput of the hf backend vs plain `transformers.generate`, same prompts and sampling.

    python benchmarks/generation_throughput.py --model models/raw --out benchmarks/results/generation_cpu.json

Prompts are the datagen workload: data questions (+ the datagen suffix) under panel-12 personas.
"Useful" tokens are the tokens a completion really has (up to and including its end-of-turn);
plain `generate` also computes padding for rows that already ended, which it does not count.
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import torch

from personaspace.completions import system_message
from personaspace.config import load_params
from personaspace.generate import ChatRequest, HFGenerator, Sampling, load_generator
from personaspace.io import write_json
from personaspace.models import render_prompt
from personaspace.personas import load_catalog


def _requests(tokenizer, n: int, suffix: str) -> list[ChatRequest]:
    catalog = load_catalog()
    personas = [catalog.persona(p) for p in catalog.panel(12)]
    questions = catalog.questions("data")
    return [
        ChatRequest(
            system_message(personas[i % len(personas)], tokenizer), questions[i % len(questions)].text + suffix, i
        )
        for i in range(n)
    ]


def _plain_generate(generator: HFGenerator, requests: list[ChatRequest], sampling: Sampling) -> tuple[int, int]:
    tokenizer, model = generator.tokenizer, generator.model
    prompts = [render_prompt(tokenizer, r.system, r.user) for r in requests]
    enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
    torch.manual_seed(0)
    with torch.inference_mode():
        out = model.generate(
            **enc, do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p,
            max_new_tokens=sampling.max_new_tokens, pad_token_id=tokenizer.pad_token_id,
        )  # fmt: skip
    new = out[:, enc["input_ids"].shape[1] :].tolist()
    useful = sum(next((k + 1 for k, t in enumerate(row) if t in generator.stop_ids), len(row)) for row in new)
    return useful, out.shape[0] * (out.shape[1] - enc["input_ids"].shape[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", type=Path, default=Path("models/raw"))
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--batch-sizes", default="64,128")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/generation_cpu.json"))
    args = parser.parse_args()
    params = load_params(args.params)
    dg = params.datagen
    sampling = Sampling(dg.temperature, dg.top_p, dg.max_new_tokens)
    results = []
    for batch_size in [int(b) for b in args.batch_sizes.split(",")]:
        generator = load_generator("hf", args.model, batch_size=batch_size, progress=False)
        assert isinstance(generator, HFGenerator)
        requests = _requests(generator.tokenizer, batch_size, dg.user_suffix)
        generator.generate(requests[:4], Sampling(1.0, 1.0, 4))  # warm-up
        start = time.perf_counter()
        completions = generator.generate(requests, sampling)
        ours_s = time.perf_counter() - start
        ours_tokens = sum(c.n_tokens for c in completions)
        start = time.perf_counter()
        plain_useful, plain_slots = _plain_generate(generator, requests, sampling)
        plain_s = time.perf_counter() - start
        row = {
            "batch_size": batch_size,
            "max_new_tokens": sampling.max_new_tokens,
            "personaspace_hf": {"seconds": ours_s, "tokens": ours_tokens, "tok_per_s": ours_tokens / ours_s},
            "transformers_generate": {
                "seconds": plain_s, "useful_tokens": plain_useful, "useful_tok_per_s": plain_useful / plain_s,
                "computed_token_slots": plain_slots, "slot_tok_per_s": plain_slots / plain_s,
            },
        }  # fmt: skip
        print(row)
        results.append(row)
    write_json(
        {
            "benchmark": "generation_throughput",
            "model": str(args.model),
            "device": str(generator.model.device),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "dtype": str(generator.model.dtype),
            "torch_threads": torch.get_num_threads(),
            "machine": platform.platform(),
            "processor": platform.processor(),
            "results": results,
        },
        args.out,
    )


if __name__ == "__main__":
    main()
