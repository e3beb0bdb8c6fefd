"""One steering hook, used by training and by generation: add ``coef * vector`` at a layer.

>>> with steer(model, layer=20, vector=v, coef=2.0):                     # doctest: +SKIP
...     generator.generate(requests, sampling)

Layer convention (the same everywhere in personaspace): layer 0 is the embedding output and layer
k (1..L) is the output of decoder block k, i.e. ``hidden_states[k]`` of a transformers forward
with ``output_hidden_states=True``. Steering "at layer k" edits exactly that tensor: the hook sits
on block k's output, so every later block reads the steered residual stream. (transformers applies
the final norm before storing ``hidden_states[L]``; steering at L edits the block output before it.)

Sharp edge (tested): transformers 5 records ``output_hidden_states`` with its own hook, which runs
before this one, so a steered forward still *reports* the unsteered ``hidden_states[k]`` while
every later block reads the steered value. Read steered states with a hook, not that output.

Training steers through the same hook (``personaspace.train.train_adapter(..., steering=...)``): a
packed batch holds rows of several personas, so there the vector is per token, read from the
batch at every forward (``vector`` given as a callable). The vectors themselves:

- ``steering_vectors``: persona centroids, raw or centered over a named bank, with their norms;
- ``iso_random``: the norm-matched isotropic Gaussian control, seeded from stable ids;
- ``calibrated_coef``: c with ||c v|| / mean ||h_L|| = a target ratio, ``mean_hidden_norm``
  measuring mean ||h_L|| on the base over the training rows.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from personaspace.seeds import stable_seed


def decoder_layers(model: Any) -> Any:
    """The list of decoder blocks of a causal LM, through a peft wrapper if there is one."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    layers = getattr(getattr(base, "model", None), "layers", None)
    if layers is None:
        raise TypeError(f"cannot find decoder blocks (model.model.layers) in {type(base).__name__}")
    return layers


@contextmanager
def steer(model: Any, layer: int, vector: Any, coef: float) -> Iterator[None]:
    """Add ``coef * vector`` to hidden_states[layer] (1 <= layer <= num blocks) for every token.

    ``vector``: one (hidden,) vector for every token, or a callable returning, at each forward, a
    tensor that broadcasts against the block output (batch, tokens, hidden): per-token vectors of a
    packed training batch. The hook is removed on exit, an error included.
    """
    import torch

    layers = decoder_layers(model)
    if not 1 <= layer <= len(layers):
        raise ValueError(f"steering layer {layer} is outside 1..{len(layers)} (layer 0 is the embedding output)")
    hidden_size = model.config.hidden_size
    if not callable(vector):
        vector = torch.as_tensor(vector)
        if vector.ndim != 1 or vector.shape[0] != hidden_size:
            raise ValueError(f"steering vector has shape {tuple(vector.shape)}, expected ({hidden_size},)")

    placed: dict[tuple[Any, Any], Any] = {}  # the vector on each (device, dtype) it meets, copied once

    def current(hidden: Any) -> Any:
        if callable(vector):
            value = vector()
            if value.shape[-1] != hidden_size:
                raise ValueError(f"steering vectors have shape {tuple(value.shape)}, expected (..., {hidden_size})")
            return value.to(hidden.device, hidden.dtype)
        key = (hidden.device, hidden.dtype)
        if key not in placed:  # never a host copy per step: a CUDA graph captures the hook with this tensor
            placed[key] = vector.to(hidden.device, hidden.dtype)
        return placed[key]

    def add(_module, _inputs, output):
        hidden = output[0] if isinstance(output, tuple) else output
        hidden = hidden + coef * current(hidden)
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    handle = layers[layer - 1].register_forward_hook(add)
    try:
        yield
    finally:
        handle.remove()


@dataclass(frozen=True)
class TrainingSteering:
    """Steering during training: row i of ``vectors`` (already times its coefficient) is added at
    ``layer`` to every token of the rows of ``personas[i]``."""

    layer: int
    personas: tuple[str, ...]
    vectors: np.ndarray  # (len(personas), hidden): c_p * v_p

    def __post_init__(self) -> None:
        if self.vectors.ndim != 2 or self.vectors.shape[0] != len(self.personas):
            raise ValueError(
                f"steering vectors have shape {self.vectors.shape}, expected ({len(self.personas)}, hidden)"
            )

    def index(self, persona: str) -> int:
        """The row of ``persona``'s vector; a persona without one is an error naming it."""
        if persona not in self.personas:
            raise ValueError(f"no steering vector for persona {persona!r} (vectors for {list(self.personas)})")
        return self.personas.index(persona)


def steering_vectors(
    order: Sequence[str], centroid: np.ndarray, centering: str, bank: Sequence[str] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(vectors, norms): each persona's centroid (``order`` x layers x hidden), raw or centered over ``bank``.

    Centered (the mean centroid of the bank subtracted) is what makes a centroid a *persona*
    direction: raw centroids share a component of ~0.99 cosine (the chat template and the
    assistant role; S3 saw > 0.998), so steering with one mostly pushes along what every persona has.
    """
    if centering == "raw":
        vectors = np.asarray(centroid, dtype=np.float64)
    elif centering == "centered":
        index = {p: i for i, p in enumerate(order)}
        missing = [p for p in bank or [] if p not in index]
        if not bank or missing:
            raise ValueError(f"centering bank {list(bank or [])} names personas without centroids: {missing}")
        vectors = centroid - centroid[[index[p] for p in bank]].mean(axis=0, keepdims=True)
    else:
        raise ValueError(f"centering {centering!r}: choose raw or centered")
    return vectors, np.linalg.norm(vectors, axis=-1)


def iso_random(norm: float, hidden_size: int, *stable_ids: object) -> np.ndarray:
    """A norm-matched isotropic Gaussian direction: seeded by ``stable_ids`` only, so it is frozen."""
    rng = np.random.default_rng(stable_seed("iso_random", *stable_ids))
    draw = rng.standard_normal(hidden_size)
    return draw * (norm / np.linalg.norm(draw))


def calibrated_coef(vector_norm: float, hidden_norm: float, ratio: float) -> float:
    """c such that ||c v|| / mean ||h_L|| = ``ratio``."""
    if vector_norm <= 0:
        raise ValueError("a zero steering vector cannot be calibrated")
    return ratio * hidden_norm / vector_norm


def mean_hidden_norm(
    model: Any,
    sequences: Sequence[Sequence[int]],
    layers: Sequence[int],
    batch_size: int,
    pad_token_id: int,
    progress: Callable[[int], None] | None = None,
) -> np.ndarray:
    """Mean ||hidden_states[k]|| over every token of ``sequences`` but each one's first, for each k of ``layers``.

    The first position is left out: it is an attention sink whose state is about 100 times the norm
    of the rest on these models (SmolLM2 at layer 21: ~25,000 against ~250), and no answer depends
    on steering it. Sequences are left-padded in batches; padding is masked out.
    """
    import torch

    total, count = np.zeros(len(layers)), 0
    with torch.inference_mode():
        for start in range(0, len(sequences), batch_size):
            rows = [list(ids) for ids in sequences[start : start + batch_size]]
            width = max(len(r) for r in rows)
            ids = torch.tensor([[pad_token_id] * (width - len(r)) + r for r in rows], device=model.device)
            mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=model.device)
            hidden = model(input_ids=ids, attention_mask=mask, output_hidden_states=True, logits_to_keep=1)
            keep = mask.clone()
            keep[torch.arange(len(rows)), width - torch.tensor([len(r) for r in rows])] = 0  # each first token
            for i, layer in enumerate(layers):
                total[i] += float((hidden.hidden_states[layer].float().norm(dim=-1) * keep).sum())
            count += int(keep.sum())
            if progress:
                progress(len(rows))
    if not count:
        raise ValueError("no token to measure: every sequence has a single token")
    return total / count


def steering_artifacts(
    order: Sequence[str],
    centroid: np.ndarray,
    layers: Sequence[int],
    bank: Sequence[str],
    centering: str,
    hidden_norm: np.ndarray,
    ratio: float,
    *stable_ids: object,
) -> dict[str, Any]:
    """Per persona (``order``) and steering layer: the vector, its iso-random control, their norm and c_train.

    ``centroid`` is (personas, len(layers), hidden), the centroids at ``layers``; ``hidden_norm`` the
    base's mean ||h|| at each. The controls are seeded by ``stable_ids``, the persona and the layer.
    """
    vectors, norms = steering_vectors(order, centroid, centering, bank)
    hidden_size = centroid.shape[-1]
    controls = np.stack([
        np.stack([iso_random(norms[i, j], hidden_size, *stable_ids, persona, layer) for j, layer in enumerate(layers)])
        for i, persona in enumerate(order)
    ])  # fmt: skip
    coefs = np.array([[calibrated_coef(norms[i, j], hidden_norm[j], ratio) for j in range(len(layers))]
                      for i in range(len(order))])  # fmt: skip
    return {"personas": list(order), "layers": list(layers), "centroid": vectors, "iso_random": controls,
            "norm": norms, "coef": coefs, "hidden_norm": np.asarray(hidden_norm, dtype=float)}  # fmt: skip


@dataclass(frozen=True)
class SteeringVectors:
    """The `steering` stage's vectors.npz: per persona and steering layer, the vectors and c_train."""

    personas: tuple[str, ...]
    layers: tuple[int, ...]
    arrays: Mapping[str, np.ndarray]  # centroid, iso_random: (personas, layers, hidden); coef: (personas, layers)

    @classmethod
    def load(cls, folder: Path) -> SteeringVectors:
        with np.load(Path(folder) / "vectors.npz") as data:
            arrays = {k: data[k] for k in ("centroid", "iso_random", "coef")}
            return cls(tuple(data["personas"].tolist()), tuple(data["layers"].tolist()), arrays)

    def vector(self, kind: str, persona: str, layer: int) -> np.ndarray:
        return self.arrays[kind][self.personas.index(persona), self.layers.index(layer)]

    def coef(self, persona: str, layer: int) -> float:
        return float(self.arrays["coef"][self.personas.index(persona), self.layers.index(layer)])

    def scaled(self, kind: str, layer: int) -> np.ndarray:
        """c_train x v of every persona at ``layer``: (personas, hidden), the training steering of an arm."""
        if layer not in self.layers:
            raise ValueError(
                f"no steering vectors at layer {layer} (have {list(self.layers)}); rerun `dvc repro steering`"
            )
        at = self.layers.index(layer)
        return self.arrays[kind][:, at] * self.arrays["coef"][:, at, None]
