"""Hidden-state readouts, persona centroids, centering and cosines.

>>> states = last_input_states(model, tokenizer, prompts, batch_size=32)   # (prompts, L+1, hidden)  # doctest: +SKIP

Readout ``last_input``: the hidden state at the last prompt token (the assistant-start position,
after the generation prompt), at every layer, with the layer convention of ``personaspace.steering``
(index 0 = embedding output, index k = output of block k). A persona's centroid is the mean of its
readouts over the eval questions. Centered cosines subtract the mean centroid of a named centering
bank (e.g. the panel) first; the bank's name is part of every centered result.
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
    """float32 array (prompts, layers + 1, hidden): hidden states at each prompt's last token.

    With ``ranks`` of several processes, each runs every world-th batch and all get the whole array:
    the batches are those of one process, so the states are the same bytes.
    """
    import torch

    if tokenizer.padding_side != "left":
        raise ValueError("last_input_states needs a left-padding tokenizer (the last position is then the last token)")
    ranks = ranks or Ranks()
    starts = list(range(0, len(prompts), batch_size))
    out: dict[int, np.ndarray] = {}
    with torch.inference_mode():
        for k in ranks.mine(len(starts)):
            batch = list(prompts[starts[k] : starts[k] + batch_size])
            enc = tokenizer(batch, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
            hidden = model(**enc, output_hidden_states=True, logits_to_keep=1).hidden_states
            out[k] = torch.stack([h[:, -1, :] for h in hidden], dim=1).float().cpu().numpy()
    out = gather(out, ranks)
    return np.concatenate([out[k] for k in range(len(starts))])


def centroids(states: np.ndarray, personas: Sequence[str]) -> tuple[list[str], np.ndarray]:
    """Mean readout per persona: (persona order, array (personas, layers + 1, hidden))."""
    order = list(dict.fromkeys(personas))
    labels = np.asarray(personas)
    return order, np.stack([states[labels == p].mean(axis=0) for p in order])


def cosine_table(order: Sequence[str], centroid: np.ndarray, bank: Sequence[str], bank_name: str) -> pd.DataFrame:
    """Tidy cosines between every pair of personas at every layer, raw and centered over ``bank``."""
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
    layers, n = raw.shape[0], len(order)
    a, b = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    frames = [
        pd.DataFrame({
            "persona_a": np.asarray(order)[a.ravel()], "persona_b": np.asarray(order)[b.ravel()], "layer": layer,
            "cosine_raw": raw[layer].ravel(), "cosine_centered": cen[layer].ravel(), "centering_bank": bank_name,
        })
        for layer in range(layers)
    ]  # fmt: skip
    return pd.concat(frames, ignore_index=True)
