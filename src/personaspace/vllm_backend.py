"""The ``vllm`` generation backend: one engine per base model, every adapter a LoRA of it.

Chosen by ``generation.backend: vllm`` (``load_generator("vllm", ...)``); an eval stage then runs
one engine for its condition's base with every adapter of the condition served as a LoRA.

>>> generator = load_generator("vllm", "models/raw")                                      # doctest: +SKIP
>>> generator.generate([ChatRequest("You are a librarian.", "Hi", seed=1, adapter="models/adapters/x")],
...                    Sampling(temperature=1.0, top_p=0.95, max_new_tokens=64))          # doctest: +SKIP

The same interface and ``Completion`` fields as the ``hf`` backend: prompts are rendered by the
project's chat rendering and sent as token ids, each request carries its seed (vLLM's per-request
seeded sampler) and its adapter (a ``LoRARequest``: no merged copy per adapter; rsLoRA's
alpha/sqrt(r) scaling is read from the adapter's config by vLLM), ``n_tokens`` counts the
end-of-turn token, and the text is decoded from the ids as the hf backend decodes it. Requests
sharing a prompt prefix (a persona's system turn, the K samples of one question) share its
prefill through vLLM's automatic prefix caching.

Sampled tokens differ from the hf backend's (another sampler, other noise); greedy tokens and
fire rates agree (tests/test_vllm_backend.py, run in the vLLM environment). vLLM cannot host
forward hooks or return hidden states: steering and probes stay on the hf backend.

Several GPUs (README: Several GPUs): ``tensor_parallel`` GPUs hold one engine (vLLM's
``tensor_parallel_size``). Under torchrun (``personaspace.distributed.launch``) every rank runs
one shard of an engine through vLLM's ``external_launcher`` executor, ``world / tensor_parallel``
engines run data parallel (``data_parallel_size``), each ``generate`` call's requests are cut into
one contiguous block per engine (a persona's requests stay together for prefix caching) and the
completions gathered on every rank. Each request keeps its own seed, so which engine samples it
does not choose its noise.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from personaspace.distributed import Ranks, at_finish, gather
from personaspace.generate import ChatRequest, Completion, Sampling

LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the max_lora_rank values vLLM accepts


def lora_rank(adapter: Path | str) -> int:
    """The rank ``r`` of a peft LoRA adapter folder, from its adapter_config.json."""
    config = Path(adapter) / "adapter_config.json"
    if not config.is_file():
        raise FileNotFoundError(f"no peft adapter at {adapter} (no adapter_config.json)")
    return int(json.loads(config.read_text())["r"])


def engine_lora_rank(ranks: Sequence[int]) -> int:
    """The smallest ``max_lora_rank`` vLLM accepts that holds every adapter's rank."""
    need = max(ranks, default=1)
    for rank in LORA_RANKS:
        if rank >= need:
            return rank
    raise ValueError(f"a LoRA of rank {need} is above vLLM's largest max_lora_rank ({LORA_RANKS[-1]})")


class VLLMGenerator:
    """vLLM backend (GPU, or vLLM's CPU build in its own environment for tests).

    The engine starts at the first ``generate`` call, sized for ``loras`` and the adapters the call
    brings (the smallest ``max_lora_rank`` that holds them, every one resident at once), so one
    engine serves all of an eval stage's adapters. ``adapter`` applies to requests that name none.
    """

    sampler = "vllm"  # part of an eval cell's key: another sampler, other completions

    def __init__(
        self,
        model_path: Path | str,
        adapter: Path | str | None = None,
        loras: Sequence[Path | str] = (),
        dtype: str = "auto",
        max_model_len: int | None = None,
        progress: bool = True,
        ranks: Ranks | None = None,
        tensor_parallel: int = 1,
    ):
        try:
            import vllm  # noqa: F401
        except ImportError as exc:
            raise ImportError(
                "the vllm backend needs vLLM in this environment (`pip install personaspace[gpu]` on a GPU "
                "machine; `make vllm-env` builds vLLM's CPU build beside the project for the tests)"
            ) from exc
        from personaspace.models import load_tokenizer

        self.model_path = Path(model_path)
        self.adapter = None if adapter is None else str(adapter)
        self.loras = [str(a) for a in ([] if adapter is None else [adapter])] + [str(a) for a in loras]
        self.dtype = dtype
        self.max_model_len = max_model_len
        self.tokenizer = load_tokenizer(model_path)
        self.progress = progress
        self.ranks = ranks or Ranks()
        if self.ranks.world > 1 and self.ranks.world % tensor_parallel:
            raise ValueError(
                f"parallel.tensor: {tensor_parallel} does not divide {self.ranks.world} processes into whole engines"
            )
        self.tensor_parallel = tensor_parallel
        self.llm: Any = None
        self.stop_ids: frozenset[int] = frozenset()
        self._lora_ids: dict[str, int] = {}
        self._max_lora_rank = 0

    def _start(self, adapters: list[str]) -> None:
        from vllm import LLM
        from vllm.platforms import current_platform

        from personaspace.models import resolve_dtype

        cpu = current_platform.is_cpu()
        # vLLM's CPU build sizes its KV cache from this (GiB); its default takes a quarter of the RAM
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
        torch_dtype = resolve_dtype(self.dtype, "cpu" if cpu else "cuda")
        self._max_lora_rank = engine_lora_rank([lora_rank(a) for a in adapters])
        parallel: dict[str, Any] = {"tensor_parallel_size": self.tensor_parallel}
        if self.ranks.world > 1:  # torchrun's processes: one engine shard each, engines side by side
            parallel |= {
                "data_parallel_size": self.ranks.world // self.tensor_parallel,
                "distributed_executor_backend": "external_launcher",
            }
        self.llm = LLM(
            **parallel,
            model=str(self.model_path),
            dtype=str(torch_dtype).removeprefix("torch."),
            enable_lora=bool(adapters),
            max_lora_rank=self._max_lora_rank,
            max_loras=max(1, len(adapters)),  # every adapter resident: no swapping within a call
            max_model_len=self.max_model_len,
            enable_prefix_caching=True,
            enforce_eager=cpu,  # CUDA graphs on a GPU; the CPU build runs eagerly
            seed=0,  # every request brings its own seed; this only fixes the engine's default
        )
        if self.ranks.world > 1:
            # the engine's groups live on the stage's process group: shut it down before the stage leaves it
            at_finish(self.llm.llm_engine.engine_core.shutdown)
        eos = self.llm.llm_engine.model_config.hf_config.eos_token_id
        generation_eos = self.tokenizer.eos_token_id
        self.stop_ids = frozenset([*(eos if isinstance(eos, list) else [eos]), generation_eos]) - {None}

    def _lora(self, adapter: str | None) -> Any:
        from vllm.lora.request import LoRARequest

        if adapter is None:
            return None
        lora_id = self._lora_ids.setdefault(adapter, len(self._lora_ids) + 1)  # vLLM's ids start at 1
        return LoRARequest(lora_name=adapter, lora_int_id=lora_id, lora_path=str(adapter))

    def generate(self, requests: Sequence[ChatRequest], sampling: Sampling) -> list[Completion]:
        if any(r.steering is not None for r in requests):
            raise ValueError(
                "steered requests need the hf backend: vLLM cannot host forward hooks; set generation.backend: hf"
            )
        adapters = [self.adapter if r.adapter is None else str(r.adapter) for r in requests]
        named = list(dict.fromkeys(a for a in adapters if a is not None))
        if self.llm is None:
            self._start(list(dict.fromkeys([*self.loras, *named])))
        elif named and (not self._max_lora_rank or max(map(lora_rank, named)) > self._max_lora_rank):
            raise ValueError(
                f"this vLLM engine was started for LoRAs up to rank {self._max_lora_rank}; "
                "pass every adapter in the first generate call, or load a new generator"
            )
        # data parallel: one contiguous block of requests per engine (every shard of an engine gets the same)
        config = self.llm.llm_engine.vllm_config.parallel_config
        engine, engines = config.data_parallel_rank, config.data_parallel_size
        share = range(len(requests) * engine // engines, len(requests) * (engine + 1) // engines)
        mine = self._generate([requests[i] for i in share], [adapters[i] for i in share], sampling)
        local = dict(zip(share, mine, strict=True))
        completions = gather(local, self.ranks)
        return [completions[i] for i in range(len(requests))]

    def _generate(
        self, requests: Sequence[ChatRequest], adapters: Sequence[str | None], sampling: Sampling
    ) -> list[Completion]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        from personaspace.models import render_prompt

        if not requests:
            return []
        prompts = [render_prompt(self.tokenizer, r.system, r.user) for r in requests]
        ids = self.tokenizer(prompts, add_special_tokens=False)["input_ids"]
        params = [
            SamplingParams(
                temperature=sampling.temperature, top_p=sampling.top_p, max_tokens=sampling.max_new_tokens,
                seed=r.seed, stop_token_ids=sorted(self.stop_ids), detokenize=False,
            )
            for r in requests
        ]  # fmt: skip
        outputs = self.llm.generate(
            [TokensPrompt(prompt_token_ids=p) for p in ids], params,
            lora_request=[self._lora(a) for a in adapters], use_tqdm=self.progress,
        )  # fmt: skip
        return [self._completion(list(out.outputs[0].token_ids), out.outputs[0].finish_reason) for out in outputs]

    def _completion(self, ids: list[int], reason: str | None) -> Completion:
        if reason == "stop":
            # vLLM keeps the end-of-turn token in token_ids (a stop token id too); count it, never decode it
            if not ids or ids[-1] not in self.stop_ids:
                raise RuntimeError(f"vLLM stopped without an end-of-turn token: {ids[-3:]}")
            text_ids = ids[:-1]
        elif reason == "length":
            text_ids = ids
        else:
            raise RuntimeError(f"vLLM finished a request with {reason!r} (neither stop nor length)")
        return Completion(self.tokenizer.decode(text_ids, skip_special_tokens=True).strip(), len(ids), reason)
