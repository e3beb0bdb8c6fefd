"""A decode loop that keeps the host out of the GPU's way: static KV cache, CUDA graphs, checks every k steps.

>>> generator = StaticDecodeGenerator(model, tokenizer, batch_size=256)          # doctest: +SKIP
>>> generator.generate(requests, sampling)  # the same Completions as HFGenerator, same seeds  # doctest: +SKIP

``HFGenerator``'s loop syncs with the host at every step (the sampled tokens come back as a list,
finished rows are dropped at once) and its ``DynamicCache`` grows by concatenation, so on a GPU a
Qwen2.5-7B decode step costs ~50 ms of host work against ~7 ms of GPU work. Here:

- the prompt is prefilled as ``HFGenerator`` does (each shared system prefix once), then its keys and
  values are copied into preallocated buffers of the batch's full length (prompt + max_new_tokens);
  a step writes its one new position in place (``StaticKVCache``) and attends under a preallocated
  boolean mask, so every step of a batch has the same shapes;
- on CUDA the forward of one step is captured once per batch-size bucket as a CUDA graph and
  replayed (one launch per step instead of hundreds); steering hooks are captured with it, so
  ``personaspace.steering.steer`` keeps its vector on the model's device;
- sampled tokens and end-of-turn flags stay on the device; the host looks every ``check_every``
  steps, and compacts the batch (keys, values, mask, positions, seeds) to the smallest bucket that
  holds the rows still running;
- sampling is ``generate.sample_nucleus``'s counter-based rule: each row's top candidates draw the
  same noise for (seed, step, token). A row whose nucleus is wider than the candidates needs the
  exact dense path, which costs a host sync; the loop notices such rows at the next check, rewinds
  to the last check (the buffers are rewritten in place) and replays that window step by step with
  the exact sampler, so the completions are the same as ``HFGenerator``'s for the same seeds.

Rows that end between checks run on (their extra tokens are dropped). Not used by the stages yet:
the hf backend switches to it on CUDA in the GPU issue's next step (benchmarks/gpu_7b.py measures it).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

from personaspace.generate import Completion, HFGenerator, Sampling, sample_candidates, sample_nucleus

DECODE_ATTENTION = "personaspace_gqa_decode"  # the attention the loop's model runs while it decodes


def gqa_decode_attention(
    module: Any, query: Any, key: Any, value: Any, attention_mask: Any, scaling: float | None = None,
    dropout: float = 0.0, **kwargs: Any,
) -> tuple[Any, None]:  # fmt: skip
    """Attention of one new position per row, each group of query heads on its shared key/value head.

    transformers' SDPA path copies the whole key/value cache to every query head (``repeat_kv``)
    whenever a mask is given on CUDA, which at 256 rows x 28 heads reads ~7x the cache per layer
    per step. Here the query heads sharing a key/value head are that head's query positions (the
    layout ``repeat_kv`` uses), so the cache is read once. Other shapes go to transformers' SDPA.
    """
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if query.shape[2] != 1 or dropout:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)  # fmt: skip
    rows, heads, _, dim = query.shape
    grouped = query.reshape(rows, key.shape[1], heads // key.shape[1], dim)
    out = torch.nn.functional.scaled_dot_product_attention(grouped, key, value, attn_mask=attention_mask, scale=scaling)
    return out.reshape(rows, 1, heads, dim), None  # (rows, query length 1, heads, dim), as SDPA's path returns


@contextmanager
def decode_attention(model: Any) -> Iterator[None]:
    """Run ``model``'s attention through ``gqa_decode_attention`` inside the block."""
    from transformers import AttentionInterface

    AttentionInterface.register(DECODE_ATTENTION, gqa_decode_attention)
    before = model.config._attn_implementation
    model.config._attn_implementation = DECODE_ATTENTION
    try:
        yield
    finally:
        model.config._attn_implementation = before


BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)  # batch sizes the compacted batch takes


def bucket_for(rows: int, largest: int) -> int:
    """The smallest bucket that holds ``rows`` (the full batch, ``largest``, when none smaller does)."""
    return next((b for b in BUCKETS if rows <= b < largest), largest)


class StaticKVCache:
    """Key/value buffers of shape (rows, kv heads, capacity, head dim) per layer, written in place.

    Duck-types the part of transformers' ``Cache`` a decoder forward uses (``update``): each call
    writes the step's keys and values at column ``write_at`` (a device tensor, so a captured graph
    replays at the current column) and returns the first ``rows`` rows of the whole buffers.
    """

    is_compileable = False

    def __init__(self, prefill: Any, capacity: int) -> None:
        import torch

        self.layers_kv = []
        for layer in prefill.layers:
            keys, values = layer.keys, layer.values
            shape = (keys.shape[0], keys.shape[1], capacity, keys.shape[3])
            k = torch.zeros(shape, dtype=keys.dtype, device=keys.device)
            v = torch.zeros((*shape[:3], values.shape[3]), dtype=values.dtype, device=values.device)
            k[:, :, : keys.shape[2]] = keys
            v[:, :, : values.shape[2]] = values
            self.layers_kv.append((k, v))
        self.capacity = capacity
        self.rows = prefill.layers[0].keys.shape[0]
        self.write_at = torch.zeros(1, dtype=torch.int64, device=prefill.layers[0].keys.device)

    def update(self, key_states: Any, value_states: Any, layer_idx: int, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
        k, v = self.layers_kv[layer_idx]
        k, v = k[: self.rows], v[: self.rows]
        k.index_copy_(2, self.write_at, key_states)
        v.index_copy_(2, self.write_at, value_states)
        return k, v

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.capacity  # only read where positions are not given; they always are here

    def select(self, index: Any, rows: int) -> None:
        """Keep the rows ``index`` (on the device) as the first rows, and use ``rows`` of them from now on."""
        for k, v in self.layers_kv:
            k[: len(index)] = k[index]
            v[: len(index)] = v[index]
        self.rows = rows


class StaticDecodeGenerator(HFGenerator):
    """``HFGenerator`` with the static, graph-captured decode loop (see the module docstring).

    ``graphs``: capture CUDA graphs (default: on a CUDA device); without them the same loop runs
    eagerly, which is how the CPU tests check it. ``check_every``: steps between host checks.
    """

    def __init__(self, *args: Any, check_every: int = 8, graphs: bool | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.check_every = check_every
        self.graphs = graphs

    def _generate_batch(
        self, model: Any, prompts: list[list[int]], groups: list[str | None], seeds: list[int], sampling: Sampling
    ) -> list[Completion]:
        import torch
        from torch.nn.attention import SDPBackend, sdpa_kernel
        from transformers import TemperatureLogitsWarper

        device = model.device
        graphs = device.type == "cuda" if self.graphs is None else self.graphs
        sliding = {t for t in getattr(model.config, "layer_types", None) or ["full_attention"]} - {"full_attention"}
        if sliding:  # the static cache is full attention only: such models decode in HFGenerator's loop
            return super()._generate_batch(model, prompts, groups, seeds, sampling)
        temper = TemperatureLogitsWarper(sampling.temperature)
        n, max_new = len(prompts), sampling.max_new_tokens
        kernels = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
        with torch.inference_mode(), sdpa_kernel(kernels), ExitStack() as decoding:
            out, prefill_cache, mask2d, last_position = self._prefill(model, prompts, groups)
            decoding.enter_context(decode_attention(model))
            width = mask2d.shape[1]
            capacity = -(-(width + max_new) // 16) * 16  # aligned rows for the memory-efficient kernel's mask
            cache = StaticKVCache(prefill_cache, capacity)
            del prefill_cache
            # step inputs, preallocated for the full batch; a bucket of b rows uses their first b rows
            mask = torch.zeros(n, 1, 1, capacity, dtype=torch.bool, device=device)
            mask[:, 0, 0, :width] = mask2d.bool()
            ids = torch.zeros(n, 1, dtype=torch.int64, device=device)
            positions = last_position[:, None].clone()
            row_seeds = torch.tensor(seeds, dtype=torch.int64, device=device)
            rows = torch.arange(n, device=device)  # batch row -> prompt index (n = a dropped row)
            tokens = torch.zeros(n + 1, max_new, dtype=torch.int64, device=device)
            ends = torch.zeros(n + 1, dtype=torch.int64, device=device)  # tokens up to the end of turn; 0 = running
            stops = torch.tensor(sorted(self.stop_ids), device=device)
            step_graphs: dict[int, tuple[Any, Any]] = {}
            pool = torch.cuda.graph_pool_handle() if graphs else None

            def forward(b: int) -> Any:
                # a 4D mask is used as given (transformers builds none), so no mask code runs per step
                return model(
                    input_ids=ids[:b], attention_mask=mask[:b], position_ids=positions[:b], past_key_values=cache,
                    use_cache=True, logits_to_keep=1,
                ).logits  # fmt: skip

            def step_logits(b: int) -> Any:
                if not graphs:
                    return forward(b)
                if b not in step_graphs:
                    # warm up on a side stream (allocator, kernel choice), then capture; the warm-up
                    # writes the same cache column the replay rewrites
                    stream = torch.cuda.Stream()
                    stream.wait_stream(torch.cuda.current_stream())
                    with torch.cuda.stream(stream):
                        forward(b)
                    torch.cuda.current_stream().wait_stream(stream)
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph, pool=pool):
                        logits = forward(b)
                    step_graphs[b] = (graph, logits)
                graph, logits = step_graphs[b]
                graph.replay()
                return logits

            b = n  # rows in the running batch (a bucket size once compacted)
            logits = out.logits
            exact = False  # after a rewind the batch samples exactly, checking every step
            window_wide = torch.zeros((), dtype=torch.bool, device=device)

            def checkpoint(at: int) -> tuple:
                window_wide.zero_()
                return at, logits[:b].clone(), tokens.clone(), ends.clone(), positions[:b].clone()

            saved = checkpoint(0)
            step = 0
            while True:
                scores = temper(None, logits[:b, -1, :].float())
                if exact:
                    chosen = sample_nucleus(scores, sampling.top_p, row_seeds[:b], step)
                else:
                    chosen, wide = sample_candidates(scores, sampling.top_p, row_seeds[:b], step)
                    window_wide |= wide.any()
                tokens[rows, step] = chosen
                ended = (ends[rows] == 0) & torch.isin(chosen, stops)
                ends[rows] = torch.where(ended, step + 1, ends[rows])
                last = step == max_new - 1
                new_window = False
                if exact or last or (step + 1 - saved[0]) % self.check_every == 0:
                    if not exact and bool(window_wide):  # a row needed the dense path: replay the window exactly
                        step, logits, tokens_then, ends_then, positions_then = saved
                        tokens.copy_(tokens_then)
                        ends.copy_(ends_then)
                        positions[:b] = positions_then
                        mask[:, 0, 0, width + step :] = False
                        exact = True
                        continue
                    alive = (ends[rows] == 0) & (rows < n)
                    if last or not bool(alive.any()):
                        break
                    keep = alive.nonzero().squeeze(1)
                    smaller = bucket_for(len(keep), b)
                    if smaller < b:  # compact: the running rows first, padded with a copy of one of them
                        index = torch.cat([keep, keep[:1].expand(smaller - len(keep))])
                        cache.select(index, smaller)
                        mask[:smaller] = mask[index]
                        positions[:smaller] = positions[index]
                        row_seeds[:smaller] = row_seeds[index]
                        chosen = chosen[index]
                        rows = torch.cat([rows[keep], torch.full((smaller - len(keep),), n, device=device)])
                        b = smaller
                    new_window = not exact
                ids[:b, 0] = chosen
                positions[:b] += 1
                mask[:b, 0, 0, width + step] = True
                cache.write_at.fill_(width + step)
                cache.rows = b
                logits = step_logits(b)
                step += 1
                if new_window:
                    saved = checkpoint(step)
            tokens_host, ends_host = tokens[:n].tolist(), ends[:n].tolist()
        return [
            self._completion(row[:end] if end else row, "stop" if end else "length")
            for row, end in zip(tokens_host, ends_host, strict=True)
        ]
