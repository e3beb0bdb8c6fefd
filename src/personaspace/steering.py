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
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


def decoder_layers(model: Any) -> Any:
    """The list of decoder blocks of a causal LM, through a peft wrapper if there is one."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    layers = getattr(getattr(base, "model", None), "layers", None)
    if layers is None:
        raise TypeError(f"cannot find decoder blocks (model.model.layers) in {type(base).__name__}")
    return layers


@contextmanager
def steer(model: Any, layer: int, vector: Any, coef: float) -> Iterator[None]:
    """Add ``coef * vector`` to hidden_states[layer] (1 <= layer <= num blocks) for every token."""
    import torch

    layers = decoder_layers(model)
    if not 1 <= layer <= len(layers):
        raise ValueError(f"steering layer {layer} is outside 1..{len(layers)} (layer 0 is the embedding output)")
    vector = torch.as_tensor(vector)
    if vector.ndim != 1 or vector.shape[0] != model.config.hidden_size:
        raise ValueError(f"steering vector has shape {tuple(vector.shape)}, expected ({model.config.hidden_size},)")

    placed: dict[tuple[Any, Any], Any] = {}  # the vector on each (device, dtype) it meets, copied once

    def add(_module, _inputs, output):
        hidden = output[0] if isinstance(output, tuple) else output
        key = (hidden.device, hidden.dtype)
        if key not in placed:  # never a host copy per step: a CUDA graph captures the hook with this tensor
            placed[key] = vector.to(hidden.device, hidden.dtype)
        hidden = hidden + coef * placed[key]
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    handle = layers[layer - 1].register_forward_hook(add)
    try:
        yield
    finally:
        handle.remove()
