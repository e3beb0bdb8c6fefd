"""Hidden-state readouts, persona centroids, centering and cosines.

>>> states = last_input_states(model, tokenizer, prompts, batch_size=32)   # (prompts, L+1, hidden)  # doctest: +SKIP
>>> by_name = readout_states(model, tokenizer, prompts, responses, ["last_response"], layers=[6, 10], batch_size=8)  # doctest: +SKIP

Readouts, by name, each at any list of layers with the layer convention of ``personaspace.steering``
(index 0 = embedding output, index k = output of block k):

- ``last_input``: the hidden state at the last prompt token (the assistant-start position, after
  the generation prompt);
- ``prompt_mean``: the mean over every prompt token (chat template included);
- ``last_response``: the hidden state at the last token of a sampled answer, read by one forward
  over prompt + answer (the answer's tokens without its end-of-turn token);
- ``response_mean``: the mean over the answer's tokens.

An empty answer (end-of-turn sampled first) has no token of its own: its response readouts read
the last prompt token. A persona's centroid is the mean of its readouts over the eval questions.
Centered cosines subtract the mean centroid of a named centering bank (e.g. the panel) first; the
bank's name is part of every centered result.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from personaspace.distributed import Ranks, gather


def last_input_states(
    model: Any, tokenizer: Any, prompts: Sequence[str], batch_size: int, ranks: Ranks | None = None
) -> np.ndarray:
    """float32 array (prompts, layers + 1, hidden): hidden states at each prompt's last token, every layer.

    With ``ranks`` of several processes, each runs every world-th batch and all get the whole array:
    the batches are those of one process, so the states are the same bytes.
    """
    return readout_states(model, tokenizer, prompts, None, ["last_input"], None, batch_size, ranks)["last_input"]


READOUTS = ("last_input", "prompt_mean", "last_response", "response_mean")
RESPONSE_READOUTS = ("last_response", "response_mean")


def span_states(
    model: Any,
    sequences: Sequence[Sequence[int]],
    spans: Sequence[tuple[int, int]],
    layers: Sequence[int] | None,
    batch_size: int,
    pad_token_id: int,
    ranks: Ranks | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(last, mean): float32 arrays (sequences, layers, hidden) at each span's last position and over it.

    Each sequence (token ids) is read by one forward, left-padded in batches as ``last_input_states``
    pads (so prompt states are the same numbers); ``spans`` are [start, end) positions in each
    unpadded sequence. ``layers``: hidden-state indices to keep (None = all). With ``ranks`` of
    several processes, each runs every world-th batch and all get the whole arrays.
    """
    import torch

    ranks = ranks or Ranks()
    starts = list(range(0, len(sequences), batch_size))
    out: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    with torch.inference_mode():
        for k in ranks.mine(len(starts)):
            rows = [list(ids) for ids in sequences[starts[k] : starts[k] + batch_size]]
            width = max(len(r) for r in rows)
            ids = torch.tensor([[pad_token_id] * (width - len(r)) + r for r in rows], device=model.device)
            mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=model.device)
            hidden = model(
                input_ids=ids, attention_mask=mask, output_hidden_states=True, logits_to_keep=1
            ).hidden_states
            keep = range(len(hidden)) if layers is None else layers
            weights = torch.zeros(len(rows), width, device=model.device)
            last_at = []
            for i, (row, (lo, hi)) in enumerate(zip(rows, spans[starts[k] : starts[k] + batch_size], strict=True)):
                if not 0 <= lo < hi <= len(row):
                    raise ValueError(f"span {(lo, hi)} is not a non-empty range of a {len(row)}-token sequence")
                offset = width - len(row)
                weights[i, offset + lo : offset + hi] = 1.0 / (hi - lo)
                last_at.append(offset + hi - 1)
            at = torch.tensor(last_at, device=model.device)
            # layer by layer: never a float copy of every layer at every position
            last = torch.stack([hidden[i][torch.arange(len(rows)), at].float() for i in keep], dim=1)
            mean = torch.stack([torch.einsum("bwh,bw->bh", hidden[i].float(), weights) for i in keep], dim=1)
            out[k] = (last.cpu().numpy(), mean.cpu().numpy())
    out = gather(out, ranks)
    return (
        np.concatenate([out[k][0] for k in range(len(starts))]),
        np.concatenate([out[k][1] for k in range(len(starts))]),
    )


def readout_states(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    responses: Sequence[str] | None,
    readouts: Sequence[str],
    layers: Sequence[int] | None,
    batch_size: int,
    ranks: Ranks | None = None,
) -> dict[str, np.ndarray]:
    """Each named readout: float32 array (prompts, layers, hidden) (see the module docstring).

    ``responses`` (one sampled answer per prompt) are needed by the response readouts only. The
    prompt readouts read prompt-only forwards; the response readouts, prompt + answer forwards.
    """
    unknown = [r for r in readouts if r not in READOUTS]
    if unknown:
        raise ValueError(f"unknown readouts {unknown}; choose from {list(READOUTS)}")
    prompt_ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    states: dict[str, np.ndarray] = {}
    if {"last_input", "prompt_mean"} & set(readouts):
        spans = [(0, len(ids)) for ids in prompt_ids]
        states["last_input"], states["prompt_mean"] = span_states(
            model, prompt_ids, spans, layers, batch_size, pad, ranks
        )
    if set(RESPONSE_READOUTS) & set(readouts):
        if responses is None or len(responses) != len(prompts):
            raise ValueError("the response readouts need one sampled answer per prompt")
        answer_ids = [tokenizer(r, add_special_tokens=False)["input_ids"] for r in responses]
        sequences = [p + a for p, a in zip(prompt_ids, answer_ids, strict=True)]
        # an empty answer has no token of its own: it reads the last prompt token
        spans = [
            (len(p), len(s)) if len(s) > len(p) else (len(p) - 1, len(p))
            for p, s in zip(prompt_ids, sequences, strict=True)
        ]
        states["last_response"], states["response_mean"] = span_states(
            model, sequences, spans, layers, batch_size, pad, ranks
        )
    return {r: states[r] for r in readouts}


def centroids(states: np.ndarray, personas: Sequence[str]) -> tuple[list[str], np.ndarray]:
    """Mean readout per persona: (persona order, array (personas, layers + 1, hidden))."""
    order = list(dict.fromkeys(personas))
    labels = np.asarray(personas)
    return order, np.stack([states[labels == p].mean(axis=0) for p in order])


def cosine_table(
    order: Sequence[str],
    centroid: np.ndarray,
    bank: Sequence[str],
    bank_name: str,
    layers: Sequence[int] | None = None,
) -> pd.DataFrame:
    """Tidy cosines between every pair of personas at every layer, raw and centered over ``bank``.

    ``layers``: the hidden-state index of each of the centroid's layer rows (default 0, 1, ...).
    """
    index = {p: i for i, p in enumerate(order)}
    missing = [p for p in bank if p not in index]
    if missing:
        raise ValueError(f"centering bank {bank_name!r} names personas without centroids: {missing}")
    centered = centroid - centroid[[index[p] for p in bank]].mean(axis=0, keepdims=True)

    def unit(x: np.ndarray) -> np.ndarray:
        return x / np.linalg.norm(x, axis=-1, keepdims=True)

    # Where every persona's centroid is the same vector (layer 0 at the last input token reads one
    # token's embedding), centering leaves only rounding noise: its cosines are undefined (NaN).
    spread = np.linalg.norm(centered, axis=-1, keepdims=True) / np.linalg.norm(centroid, axis=-1, keepdims=True)
    centered = np.where(spread < 1e-5, np.nan, centered)

    # clipped: rounding can put a self-cosine a hair above 1
    raw = np.clip(np.einsum("ild,jld->lij", unit(centroid), unit(centroid)), -1.0, 1.0)
    cen = np.clip(np.einsum("ild,jld->lij", unit(centered), unit(centered)), -1.0, 1.0)
    n = len(order)
    labels = list(range(raw.shape[0])) if layers is None else list(layers)
    a, b = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    frames = [
        pd.DataFrame({
            "persona_a": np.asarray(order)[a.ravel()], "persona_b": np.asarray(order)[b.ravel()], "layer": label,
            "cosine_raw": raw[row].ravel(), "cosine_centered": cen[row].ravel(), "centering_bank": bank_name,
        })
        for row, label in enumerate(labels)
    ]  # fmt: skip
    return pd.concat(frames, ignore_index=True)
