"""A random-init model with another model's exact shape and tokenizer, for GPU throughput runs.

    python benchmarks/random_init_like.py models/raw /tmp/model_shape

Throughput does not depend on weight values; random weights never end a turn, so every row runs to
max_new_tokens. Used where the real weights cannot travel (the lent GPU has no hub, and a carried
working tree is capped at 64 MiB): only config and tokenizer files are needed.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json")


def main() -> None:
    source, out = Path(sys.argv[1]), Path(sys.argv[2])
    config = AutoConfig.from_pretrained(source)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(out)
    for name in FILES:
        shutil.copy(source / name, out / name)
    print(f"{sum(p.numel() for p in model.parameters())} parameters in {out}")


if __name__ == "__main__":
    main()
