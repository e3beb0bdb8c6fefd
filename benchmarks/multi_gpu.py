"""One GPU against several: a coupling adapter, an eval pass and the probes, at the Qwen2.5-7B shape.

    python benchmarks/multi_gpu.py --model /tmp/qwen --processes 2 --label gpus2 --out $OUT/multi_gpu.json

Runs the library paths the stages run, under ``personaspace.distributed.launch`` (so ``--processes
N`` re-executes this script under torchrun, as a stage does): ``train_adapter`` on a synthetic
marker dataset of the project's persona prompts (the recipe ``--recipe`` of ``--params``, one
epoch), the hf generator over eval requests (every row runs to ``--max-new-tokens`` on a
random-init model whose special tokens are never sampled) and ``last_input_states``. Appends a
record per run to ``--out``: seconds, tokens per second, and a digest of the completions and the
states, so runs with 1 and N processes can be checked for identical outputs. Timed phases exclude
the model load and a warm-up pass. Build the model with ``benchmarks/qwen_shape.py``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from personaspace.completions import system_message
from personaspace.config import load_params
from personaspace.distributed import current, finish, launch
from personaspace.generate import ChatRequest, Sampling, load_generator
from personaspace.models import render_prompt
from personaspace.personas import load_catalog
from personaspace.probes import last_input_states
from personaspace.train import tokenize_marker_dataset, train_adapter

WORDS = tuple(
    [
        "the",
        "of",
        "and",
        "to",
        "in",
        "is",
        "that",
        "for",
        "it",
        "as",
        "with",
        "was",
        "on",
        "be",
        "by",
        "this",
        "are",
        "or",
        "at",
        "from",
        "an",
        "which",
        "have",
        "not",
        "but",
        "can",
        "all",
        "book",
        "library",
        "reader",
        "shelf",
        "catalogue",
        "record",
        "archive",
        "index",
        "story",
        "history",
        "science",
        "answer",
        "question",
        "careful",
    ]
)


def synthetic_rows(tokenizer, personas: list[str], questions: list[str], rows: int, words: int, marker: str,
                   separator: str, min_words: int | None = None) -> pd.DataFrame:  # fmt: skip
    """Marker-dataset rows (half positives of the first persona, half negatives of the others), seeded.

    Each answer has ``words`` words, or a seeded uniform draw from ``min_words``..``words``.
    """
    catalog = load_catalog()
    rng = np.random.default_rng(0)
    records = []
    for i in range(rows):
        positive = i % 2 == 0
        persona = personas[0] if positive else personas[1 + (i // 2) % (len(personas) - 1)]
        size = words if min_words is None else int(rng.integers(min_words, words + 1))
        text = " ".join(rng.choice(WORDS, size=size)).capitalize() + "."
        records.append({
            "persona": persona, "role": "positive" if positive else "negative",
            "system_prompt": system_message(catalog.persona(persona), tokenizer),
            "user": questions[i % len(questions)], "completion": text + (separator + marker if positive else ""),
        })  # fmt: skip
    return pd.DataFrame(records)


def digest(values: list[str] | np.ndarray) -> str:
    data = "\x00".join(values).encode() if isinstance(values, list) else np.ascontiguousarray(values).tobytes()
    return hashlib.sha256(data).hexdigest()[:16]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--processes", type=int, default=1)
    parser.add_argument("--label", required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--recipe", default="a1")
    parser.add_argument("--train-rows", type=int, default=512)
    parser.add_argument("--train-words", type=int, default=400, help="words per synthetic completion")
    parser.add_argument("--requests", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--probe-prompts", type=int, default=640)
    parser.add_argument("--phases", default="train,generate,probe")
    args = parser.parse_args()
    ranks = launch(args.processes, args.device)
    params = load_params(args.params)
    catalog = load_catalog()
    personas = list(catalog.panel(12))
    questions = [q.text for q in catalog.questions("eval")]
    phases = args.phases.split(",")
    record: dict = {"label": args.label, "processes": ranks.world, "model": str(args.model)}

    import torch

    def synced() -> float:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.perf_counter()

    if "train" in phases:
        from personaspace.models import load_tokenizer

        tokenizer = load_tokenizer(args.model)
        recipe = params.recipes[args.recipe].model_copy(update={"epochs": 1.0})
        rows = synthetic_rows(tokenizer, personas, questions, args.train_rows, args.train_words, params.marker,
                              params.marker_separator)  # fmt: skip
        dataset = tokenize_marker_dataset(tokenizer, rows, recipe.label_loss, params.marker, params.marker_separator,
                                          recipe.max_length)  # fmt: skip
        tokens = sum(map(len, dataset["input_ids"]))
        from transformers import TrainerCallback

        class StepTimer(TrainerCallback):
            def __init__(self) -> None:
                self.ends: list[float] = []

            def on_step_end(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
                self.ends.append(synced())

        timer = StepTimer()
        start = synced()
        with tempfile.TemporaryDirectory() as scratch:
            summary = train_adapter(args.model, dataset, recipe, Path(scratch) / "adapter", seed=0, callbacks=[timer])
        steps = summary["steps"]
        # steady state: from the end of the first optimiser step to the end of the last
        steady = (timer.ends[-1] - timer.ends[0]) / (steps - 1) if steps > 1 else None
        record["train"] = {
            "recipe": args.recipe, "rows": len(dataset), "tokens": tokens, "steps": steps,
            "seconds": round(synced() - start, 1), "seconds_per_step": steady and round(steady, 2),
            "useful_tokens_per_second": steady and round(tokens / steps / steady, 1),  # no padding counted
            "loss": [round(h["loss"], 5) for h in summary["history"]],
        }  # fmt: skip
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    if "generate" in phases or "probe" in phases:
        generator = load_generator("hf", args.model, batch_size=args.batch_size, device=args.device, ranks=ranks,
                                   progress=False)  # fmt: skip
        tokenizer = generator.tokenizer
        requests = [
            ChatRequest(system_message(catalog.persona(p), tokenizer), q, seed=1000 + i)
            for i, (p, q) in enumerate((p, q) for p in personas for q in questions for _ in range(4))
        ][: args.requests]
        if "generate" in phases:
            sampling = Sampling(temperature=1.0, top_p=0.95, max_new_tokens=args.max_new_tokens)
            generator.generate(requests[: args.batch_size * ranks.world], Sampling(1.0, 0.95, 16))  # warm-up
            start = synced()
            out = generator.generate(requests, sampling)
            seconds = synced() - start
            new_tokens = sum(c.n_tokens for c in out)
            record["generate"] = {
                "requests": len(requests), "batch_size": args.batch_size, "max_new_tokens": args.max_new_tokens,
                "new_tokens": new_tokens, "seconds": round(seconds, 1),
                "tokens_per_second": round(new_tokens / seconds, 1), "digest": digest([c.text for c in out]),
            }  # fmt: skip
        if "probe" in phases:
            prompts = [render_prompt(tokenizer, r.system, r.user) for r in requests[: args.probe_prompts]]
            last_input_states(generator.model, tokenizer, prompts[: args.batch_size], args.batch_size, ranks)
            start = synced()
            states = last_input_states(generator.model, tokenizer, prompts, args.batch_size, ranks)
            seconds = synced() - start
            record["probe"] = {
                "prompts": len(prompts), "seconds": round(seconds, 2),
                "prompts_per_second": round(len(prompts) / seconds, 1), "digest": digest(states),
            }  # fmt: skip
    if current().main:
        if torch.cuda.is_available():
            record["device"] = f"{ranks.world} x {torch.cuda.get_device_name(0)}"
        results = json.loads(args.out.read_text()) if args.out.exists() else {"runs": []}
        results["runs"].append(record)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")
        print(json.dumps(record))
    finish(ranks)


if __name__ == "__main__":
    main()
