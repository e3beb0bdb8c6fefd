"""Generation backends behind one interface: batched chat sampling with per-completion seeds.

>>> from personaspace.generate import ChatRequest, Sampling, load_generator
>>> generator = load_generator("hf", "models/base")                           # doctest: +SKIP
>>> requests = [ChatRequest(system="You are a librarian.", user="Hi", seed=1)]
>>> out = generator.generate(requests, Sampling(temperature=0.7, top_p=0.95, max_new_tokens=64))  # doctest: +SKIP
>>> out[0].text, out[0].n_tokens, out[0].finish_reason                       # doctest: +SKIP

Each request carries its own seed, and the ``hf`` backend draws every row's sampling noise from a
counter-based generator keyed on (seed, step, token), so a completion depends on (prompt, seed,
sampling) and not on which other requests shared its batch, nor on the device the noise is drawn
on. A batch runs each shared system-prompt prefix once and copies its KV cache to the rows that share it.

``n_tokens`` counts generated tokens including the end-of-turn token when there is one;
``finish_reason`` is ``stop`` (the model ended its turn) or ``length`` (max_new_tokens reached).
The ``hf`` backend keeps the model at ``generator.model`` so forward hooks (steering) and
hidden-state capture can attach to it; ``vllm`` (personaspace.vllm_backend) serves every adapter
of a call as a LoRA of one engine and runs vLLM's own workers (one process per stage).
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from personaspace.distributed import Ranks, gather

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class Steering:
    """Inference-time steering of a request: ``coef * vector`` added at ``layer`` (personaspace.steering).

    ``vector_id`` names the vector (base, persona, kind, layer); ``vector`` holds its values, so a
    request is self-contained and the cell key can hash them (``digest``).
    """

    vector_id: str
    layer: int
    coef: float
    vector: tuple[float, ...]

    def digest(self) -> str:
        """sha256 of the vector's float64 bytes: a changed vector never serves an old cell."""
        import hashlib

        import numpy as np

        return hashlib.sha256(np.asarray(self.vector, dtype=np.float64).tobytes()).hexdigest()


@dataclass(frozen=True)
class ChatRequest:
    """One completion to sample: system message (None = no system turn), user message, seed, the
    peft adapter to sample it under (None = the base model), so one call can span several adapters,
    and its steering (None = unsteered; the hf backend only)."""

    system: str | None
    user: str
    seed: int
    adapter: str | None = None
    steering: Steering | None = None


@dataclass(frozen=True)
class Sampling:
    temperature: float
    top_p: float
    max_new_tokens: int


@dataclass(frozen=True)
class Completion:
    text: str
    n_tokens: int
    finish_reason: str  # "stop" | "length"


class Generator(Protocol):
    tokenizer: Any  # the chat tokenizer prompts are rendered with
    sampler: str  # which sampler draws the tokens: the same (prompt, seed, sampling) gives other text on another

    def generate(self, requests: Sequence[ChatRequest], sampling: Sampling) -> list[Completion]: ...


# SplitMix64 (Steele, Lea & Flood 2014) on wrapping int64 tensors: a counter-based generator, so
# the noise for (seed, step, token) is the same on any device, batch size or row position.
_GAMMA = 0x9E3779B97F4A7C15
_MIX1 = 0xBF58476D1CE4E5B9
_MIX2 = 0x94D049BB133111EB


def _int64(constant: int) -> int:
    return constant - (1 << 64) if constant >= 1 << 63 else constant


def _shift_right(z: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic on negative values)."""
    return (z >> bits) & ((1 << (64 - bits)) - 1)


def _mix64(z: torch.Tensor) -> torch.Tensor:
    z = (z ^ _shift_right(z, 30)) * _int64(_MIX1)
    z = (z ^ _shift_right(z, 27)) * _int64(_MIX2)
    return z ^ _shift_right(z, 31)


def _uniform_at(seeds: torch.Tensor, step: int, tokens: torch.Tensor) -> torch.Tensor:
    """Uniforms in (0, 1) for broadcastable (seed, token) pairs at ``step``: SplitMix64, top 53 bits."""
    gamma = _int64(_GAMMA)
    key = _mix64(seeds * gamma + step)
    bits = _shift_right(_mix64(key + (tokens + 1) * gamma), 11)
    return (bits.double() + 0.5) / float(1 << 53)


def counter_uniforms(seeds: torch.Tensor, step: int, vocab: int) -> torch.Tensor:
    """Uniforms in (0, 1), shape (rows, vocab): element [i, t] depends only on (seeds[i], step, t)."""
    import torch

    tokens = torch.arange(vocab, device=seeds.device, dtype=torch.int64)
    return _uniform_at(seeds[:, None], step, tokens[None, :])


def _nucleus_keep(ordered_probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """For probabilities sorted descending: keep a token while the mass ranked above it is < top_p (the first always)."""
    keep = (ordered_probs.cumsum(-1) - ordered_probs) < top_p
    keep[:, 0] = True
    return keep


def top_p_filter(scores: torch.Tensor, top_p: float, candidates: int = 1024) -> torch.Tensor:
    """Nucleus filtering: keep each row's most likely tokens whose mass ranked above them is < ``top_p``.

    The same rule as transformers' TopPLogitsWarper, which sorts the whole vocabulary every step
    (~35% of a CPU decode step for a 49k vocabulary); here only the top ``candidates`` are sorted,
    and rows whose nucleus is larger than that fall back to the full sort.
    """
    import torch

    if top_p >= 1.0:
        return scores
    probs = scores.softmax(-1)
    k = min(candidates, scores.shape[-1])
    top_probs, top_ids = probs.topk(k, dim=-1)
    keep = _nucleus_keep(top_probs, top_p)
    out = torch.full_like(scores, float("-inf"))
    out.scatter_(1, top_ids, torch.where(keep, scores.gather(1, top_ids), float("-inf")))
    wide = top_probs.sum(-1) < top_p  # the nucleus reaches past the candidates: sort these rows fully
    if wide.any():
        ordered, order = probs[wide].sort(-1, descending=True)
        keep_all = _nucleus_keep(ordered, top_p)
        mask = torch.zeros_like(keep_all).scatter_(1, order, keep_all)
        out[wide] = scores[wide].masked_fill(~mask, float("-inf"))
    return out


def sample_rows(scores: torch.Tensor, seeds: torch.Tensor, step: int) -> torch.Tensor:
    """One token per row of ``scores`` (tempered and top-p filtered); row i's noise comes from (seeds[i], step).

    Gumbel-max: argmax(scores + Gumbel noise) is an exact sample from softmax(scores) (the
    normaliser is constant per row). Noise is drawn only where scores are finite (top-p leaves few
    tokens), for the same value it would have over the whole vocabulary.
    """
    import torch

    rows, tokens = torch.isfinite(scores).nonzero(as_tuple=True)
    uniform = _uniform_at(seeds.to(scores.device)[rows], step, tokens)
    noisy = torch.full(scores.shape, float("-inf"), dtype=torch.float64, device=scores.device)
    noisy[rows, tokens] = scores[rows, tokens].double() - torch.log(-torch.log(uniform))
    return noisy.argmax(-1)


def sample_nucleus(
    scores: torch.Tensor, top_p: float, seeds: torch.Tensor, step: int, candidates: int = 1024
) -> torch.Tensor:
    """``sample_rows(top_p_filter(scores, top_p), seeds, step)`` without building dense filtered scores.

    Noise is drawn for each row's top ``candidates`` tokens only, the nucleus among them kept, so
    the draw is the same as the dense path's (same noise for the same (seed, step, token)); rows
    whose nucleus is wider than the candidates take the dense path.
    """

    if top_p >= 1.0:
        return sample_rows(scores, seeds, step)
    seeds = seeds.to(scores.device)
    chosen, wide = sample_candidates(scores, top_p, seeds, step, candidates)
    if wide.any():
        chosen[wide] = sample_rows(top_p_filter(scores[wide], top_p, candidates), seeds[wide], step)
    return chosen


def sample_candidates(scores: Any, top_p: float, seeds: Any, step: int, candidates: int = 1024) -> tuple[Any, Any]:
    """``sample_nucleus`` for rows whose nucleus lies within the top ``candidates``, without a host sync.

    Returns (chosen tokens, wide): rows flagged ``wide`` need the exact dense path instead (their
    token here is not the exact draw). ``sample_nucleus`` and the static decode loop both draw
    through it, so they share one rule.
    """
    import torch

    probs = scores.softmax(-1)
    top_probs, top_ids = probs.topk(min(candidates, scores.shape[-1]), dim=-1)
    wide = top_probs.sum(-1) < top_p
    keep = _nucleus_keep(top_probs, top_p)
    noisy = scores.gather(1, top_ids).double() - torch.log(-torch.log(_uniform_at(seeds[:, None], step, top_ids)))
    chosen = top_ids.gather(1, noisy.masked_fill(~keep, float("-inf")).argmax(-1, keepdim=True)).squeeze(1)
    return chosen, wide


class HFGenerator:
    """transformers (+ peft) backend: padded batches, one model load, CPU or GPU.

    The decode loop drops rows from the batch (and their KV cache) as soon as they end, so the
    cost follows the tokens actually generated, not batch size x max_new_tokens.
    """

    def __init__(self, model, tokenizer, batch_size: int = 64, progress: bool = True, ranks: Ranks | None = None):
        from personaspace.cpu_kernels import in_use

        self.model = model
        self.tokenizer = tokenizer
        # part of an eval cell's key: on the CPU the kernels' instruction set changes the bytes (cpu_kernels)
        self.sampler = "hf" if model.device.type == "cuda" else f"hf-cpu-{in_use().lower()}"
        self.batch_size = batch_size
        self.progress = progress
        self.ranks = ranks or Ranks()
        eos = model.generation_config.eos_token_id
        self.stop_ids = frozenset(eos if isinstance(eos, list) else [eos])

    def generate(self, requests: Sequence[ChatRequest], sampling: Sampling) -> list[Completion]:
        from tqdm.auto import tqdm

        from personaspace.models import merged_copy, render_prompt
        from personaspace.steering import steer

        prompts = [render_prompt(self.tokenizer, r.system, r.user) for r in requests]
        ids = self.tokenizer(prompts, add_special_tokens=False)["input_ids"]
        by_adapter: dict[tuple[str | None, Steering | None], list[int]] = {}
        for i, request in enumerate(requests):  # a batch shares its adapter and its steering
            by_adapter.setdefault((request.adapter, request.steering), []).append(i)
        plan: list[tuple[str | None, Steering | None, list[int]]] = []
        for (adapter, steering), indices in by_adapter.items():
            # Requests sharing a system prompt stay together, so a batch holds few distinct prefixes.
            order = sorted(indices, key=lambda i: (requests[i].system or "", len(ids[i]), i))
            plan += [
                (adapter, steering, order[start : start + self.batch_size])
                for start in range(0, len(order), self.batch_size)
            ]
        # Several ranks deal out whole batches: each batch is the one a single process runs, so the
        # gathered completions are the same bytes whatever the number of processes.
        mine = [plan[k] for k in self.ranks.mine(len(plan))]
        results: dict[int, Completion] = {}
        bar = tqdm(total=sum(len(batch) for _, _, batch in mine), desc="generate", unit="completion",
                   disable=not self.progress)  # fmt: skip
        loaded: tuple[str | None, Any] | None = None
        for adapter, steering, batch in mine:
            if loaded is None or loaded[0] != adapter:
                loaded = None  # free the previous adapter's merged copy first
                # one adapter at a time, merged into a copy of the base (peft's mixed-adapter batches were
                # 7x slower on an H100; the vllm backend serves several adapters in one engine instead)
                loaded = (adapter, self.model if adapter is None else merged_copy(self.model, Path(adapter)))
            groups = [requests[i].system for i in batch]
            seeds = [requests[i].seed for i in batch]
            with ExitStack() as steered:
                if steering is not None:
                    steered.enter_context(steer(loaded[1], steering.layer, list(steering.vector), steering.coef))
                outputs = self._generate_batch(loaded[1], [ids[i] for i in batch], groups, seeds, sampling)
            results.update(zip(batch, outputs, strict=True))
            bar.update(len(batch))
        loaded = None
        bar.close()
        results = gather(results, self.ranks)
        return [results[i] for i in range(len(requests))]

    def _generate_batch(
        self, model: Any, prompts: list[list[int]], groups: list[str | None], seeds: list[int], sampling: Sampling
    ) -> list[Completion]:
        import torch
        from torch.nn.attention import SDPBackend, sdpa_kernel
        from transformers import TemperatureLogitsWarper

        device = model.device
        temper = TemperatureLogitsWarper(sampling.temperature)
        row_seeds = torch.tensor(seeds, dtype=torch.int64, device=device)
        active = list(range(len(prompts)))  # batch row -> prompt index
        tokens: list[list[int]] = [[] for _ in prompts]
        reasons: list[str] = [""] * len(prompts)
        # cuDNN's SDPA re-plans for every new KV length (~5 ms of CPU per layer per step on an H100),
        # which made decoding 3x slower than `generate`; the other kernels take the padding mask too.
        kernels = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
        with torch.inference_mode(), sdpa_kernel(kernels):
            out, cache, mask, last_position = self._prefill(model, prompts, groups)
            for step in range(sampling.max_new_tokens):
                scores = temper(None, out.logits[:, -1, :].float())
                chosen = sample_nucleus(scores, sampling.top_p, row_seeds, step).tolist()
                keep = []
                for row, (i, token) in enumerate(zip(active, chosen, strict=True)):
                    tokens[i].append(token)
                    if token in self.stop_ids:
                        reasons[i] = "stop"
                    elif len(tokens[i]) == sampling.max_new_tokens:
                        reasons[i] = "length"
                    else:
                        keep.append(row)
                if not keep:
                    break
                if len(keep) < len(active):
                    rows = torch.tensor(keep, device=device)
                    cache.batch_select_indices(rows)
                    mask, last_position, row_seeds = mask[rows], last_position[rows], row_seeds[rows]
                    active = [active[r] for r in keep]
                    chosen = [chosen[r] for r in keep]
                mask = torch.cat([mask, mask.new_ones(len(active), 1)], dim=-1)
                last_position = last_position + 1
                out = model(
                    input_ids=torch.tensor(chosen, device=device)[:, None], attention_mask=mask,
                    position_ids=last_position[:, None], past_key_values=cache, use_cache=True,
                )  # fmt: skip
        return [self._completion(ids, reason) for ids, reason in zip(tokens, reasons, strict=True)]

    def _prefill(self, model: Any, prompts: list[list[int]], groups: list[str | None]) -> tuple[Any, Any, Any, Any]:
        """Run the prompts through the model, each group's shared token prefix once.

        A persona's system turn is the same for all its questions (about 60% of an eval prompt's
        tokens with SmolLM2's template), so it is run once per group and its KV cache copied to the
        group's rows; the rest of each prompt is then run on top, left-padded, the padding masked.
        Returns the last-token logits output, the cache, the attention mask and the last positions.
        """
        import torch
        from transformers import DynamicCache

        device = model.device
        names = list(dict.fromkeys(groups))
        members = [[ids for ids, g in zip(prompts, groups, strict=True) if g == name] for name in names]
        # At least one token of each prompt is left for the second pass, which yields its logits.
        shared = [min(_shared_length(m), min(map(len, m)) - 1) for m in members]
        row_group = [names.index(g) for g in groups]
        cache = DynamicCache(config=model.config)
        if min(shared) > 0:
            prefix_ids, prefix_mask = _left_pad([m[0][:n] for m, n in zip(members, shared, strict=True)], device)
            model(
                input_ids=prefix_ids, attention_mask=prefix_mask, position_ids=_positions(prefix_mask),
                past_key_values=cache, use_cache=True, logits_to_keep=1,
            )  # fmt: skip
            rows = torch.tensor(row_group, device=device)
            cache.batch_select_indices(rows)
            prefix_mask = prefix_mask[rows]
            offsets = prefix_mask.sum(-1, keepdim=True)
        else:  # nothing shared: one pass over whole prompts
            shared = [0] * len(names)
            prefix_mask = torch.zeros(len(prompts), 0, dtype=torch.int64, device=device)
            offsets = torch.zeros(len(prompts), 1, dtype=torch.int64, device=device)
        rest_ids, rest_mask = _left_pad([ids[shared[g] :] for ids, g in zip(prompts, row_group, strict=True)], device)
        positions = offsets + _positions(rest_mask)
        mask = torch.cat([prefix_mask, rest_mask], dim=-1)
        out = model(
            input_ids=rest_ids, attention_mask=mask, position_ids=positions,
            past_key_values=cache, use_cache=True, logits_to_keep=1,
        )  # fmt: skip
        return out, cache, mask, positions[:, -1]

    def _completion(self, ids: list[int], reason: str) -> Completion:
        text_ids = ids[:-1] if reason == "stop" else ids
        return Completion(self.tokenizer.decode(text_ids, skip_special_tokens=True).strip(), len(ids), reason)


def _left_pad(rows: list[list[int]], device: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows left-padded into (ids, attention mask); the pad id is 0, never attended."""
    import torch

    width = max(map(len, rows))
    ids = torch.zeros(len(rows), width, dtype=torch.int64)
    mask = torch.zeros(len(rows), width, dtype=torch.int64)
    for i, row in enumerate(rows):
        if row:
            ids[i, width - len(row) :] = torch.tensor(row)
            mask[i, width - len(row) :] = 1
    return ids.to(device), mask.to(device)


def _shared_length(rows: list[list[int]]) -> int:
    """Length of the token prefix common to all rows."""
    first = rows[0]
    for n in range(min(map(len, rows))):
        if any(row[n] != first[n] for row in rows):
            return n
    return min(map(len, rows))


def _positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids of real tokens counted from 0 (padding gets 0; it is masked)."""
    return (mask.cumsum(-1) - 1).clamp_min(0)


def hf_generator(
    model: Any, tokenizer: Any, batch_size: int = 64, progress: bool = True, ranks: Ranks | None = None
) -> HFGenerator:
    """The hf backend's generator for a loaded model: the static decode loop on a CUDA device.

    ``decode.StaticDecodeGenerator`` gives the same completions several times faster on a GPU
    (benchmarks/results/gpu_7b_h200.json); on the CPU, where the plain loop's host syncs cost
    nothing, ``HFGenerator``.
    """
    if model.device.type == "cuda":
        from personaspace.decode import StaticDecodeGenerator

        return StaticDecodeGenerator(model, tokenizer, batch_size=batch_size, progress=progress, ranks=ranks)
    return HFGenerator(model, tokenizer, batch_size=batch_size, progress=progress, ranks=ranks)


def load_generator(
    backend: str,
    model_path: Path | str,
    adapter: Path | str | None = None,
    batch_size: int = 64,
    device: str = "auto",
    dtype: str = "auto",
    progress: bool = True,
    ranks: Ranks | None = None,
    loras: Sequence[Path | str] = (),
    tensor_parallel: int = 1,
) -> Generator:
    """A ready generator for ``model_path`` (+ optional peft adapter) on the named backend.

    hf: ``hf_generator`` (the static decode loop on a CUDA device, ``HFGenerator`` elsewhere).

    ``loras``: the adapters requests will name; the vllm backend sizes its one engine for all of
    them (the hf backend merges each when its batches come).

    With ``ranks`` of several processes, each loads the model on its own device (hf) or one shard
    of a vLLM engine (``tensor_parallel`` GPUs per engine) and runs its share of every ``generate``
    call; every rank gets all the completions back.
    """
    if backend == "hf":
        from personaspace.models import load_model

        if tensor_parallel != 1:
            raise ValueError("parallel.tensor is the vllm backend's; the hf backend runs a whole model per rank")

        ranks = ranks or Ranks()
        model, tokenizer = load_model(model_path, device=ranks.device(device), dtype=dtype, adapter=adapter)
        return hf_generator(model, tokenizer, batch_size=batch_size, progress=progress, ranks=ranks)
    if backend == "vllm":
        from personaspace.vllm_backend import VLLMGenerator

        return VLLMGenerator(
            model_path, adapter=adapter, loras=loras, dtype=dtype, progress=progress, ranks=ranks,
            tensor_parallel=tensor_parallel,
        )  # fmt: skip
    raise ValueError(f"unknown generation backend {backend!r}; use hf or vllm")
