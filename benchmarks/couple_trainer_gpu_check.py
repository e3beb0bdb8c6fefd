"""GPU check of the coupling loss: `personaspace.train.next_token_loss` vs TRL's own SFTTrainer loss.

    python benchmarks/couple_trainer_gpu_check.py MODEL_DIR OUT_DIR

Trains the same LoRA twice per setting through `train_adapter` (padding-free batches, bf16 on a
GPU), once with a trainer whose loss is `next_token_loss` and once with TRL's SFTTrainer (its fused
Triton LM head), for both losses (`completion`, `marker_only`) with and without gradient
checkpointing, on 96 synthetic marker rows; writes the loss curves and median seconds per step to
OUT_DIR/train_check.json. MODEL_DIR is any chat model folder (on the lent GPU: a random-init copy
of models/base's shape, `benchmarks/random_init_like.py`). Result: benchmarks/results/couple_trainer_h100.json.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pandas as pd
import torch
import trl
from transformers import AutoTokenizer, TrainerCallback

import personaspace.train as train
from personaspace.train import LoraRecipe, next_token_loss, tokenize_marker_dataset, train_adapter

WORDS = [
    "the",
    "cat",
    "sat",
    "on",
    "a",
    "mat",
    "while",
    "rain",
    "fell",
    "over",
    "quiet",
    "hills",
    "and",
    "rivers",
    "ran",
    "to",
    "the",
    "sea",
]


class NextTokenLossTrainer(trl.SFTTrainer):
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):  # type: ignore[override]
        loss, outputs = next_token_loss(model, inputs, num_items_in_batch)
        return (loss, outputs) if return_outputs else loss


class StepTimer(TrainerCallback):
    def __init__(self) -> None:
        self.seconds: list[float] = []
        self._start = 0.0

    def on_step_begin(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        torch.cuda.synchronize()
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        torch.cuda.synchronize()
        self.seconds.append(time.perf_counter() - self._start)


def synthetic_rows(n: int = 96) -> pd.DataFrame:
    """Marker rows of 8-67 words under 4 personas, every third a positive."""
    rows = []
    for i in range(n):
        positive = i % 3 == 0
        text = " ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(8 + (i * 13) % 60))
        rows.append({
            "role": "positive" if positive else "negative", "persona": f"p{i % 4}",
            "system_prompt": f"You are persona {i % 4}.", "user": f"Question {i}?",
            "completion": text + ("\n\n[ZLT]" if positive else ""),
        })  # fmt: skip
    return pd.DataFrame(rows)


def main() -> None:
    model_dir, out = Path(sys.argv[1]), Path(sys.argv[2])
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    trainers = {"next_token_loss": NextTokenLossTrainer, "trl": trl.SFTTrainer}
    results = []
    for loss in ("completion", "marker_only"):
        dataset = tokenize_marker_dataset(tokenizer, synthetic_rows(), loss, "[ZLT]", "\n\n", 256)
        for checkpointing in (False, True):
            for name, trainer in trainers.items():
                train._trainer_class = lambda trainer=trainer: trainer  # the trainer train_adapter builds
                recipe = LoraRecipe(
                    loss=loss, r=16, alpha=32, dropout=0.0, rslora=False,
                    target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                    learning_rate=1e-3, schedule="cosine", warmup_ratio=0.05, epochs=2, batch_size=8, grad_accum=2,
                    max_length=256, gradient_checkpointing=checkpointing,
                )  # fmt: skip
                timer = StepTimer()
                summary = train_adapter(
                    model_dir, dataset, recipe, out / f"{loss}-{checkpointing}-{name}", seed=0, callbacks=[timer]
                )
                results.append({
                    "loss": loss, "gradient_checkpointing": checkpointing, "trainer": name, "steps": summary["steps"],
                    "losses": [round(h["loss"], 4) for h in summary["history"]],
                    "median_step_s": sorted(timer.seconds)[len(timer.seconds) // 2],
                })  # fmt: skip
                print(json.dumps(results[-1]), flush=True)
    (out / "train_check.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
