"""The static decode loop gives HFGenerator's completions for the same seeds (eagerly, on this CPU).

The CUDA-graph capture itself needs a GPU (benchmarks/gpu_7b.py runs it there); the loop around
it (static cache, host checks every k steps, bucketed compaction, rewind to the exact sampler)
is the same code with or without graphs, and runs here eagerly.
"""

from __future__ import annotations

import pytest
import torch

from personaspace.completions import system_message
from personaspace.decode import StaticDecodeGenerator, bucket_for, sample_candidates
from personaspace.generate import ChatRequest, HFGenerator, Sampling, load_generator, sample_nucleus
from personaspace.personas import load_catalog
from personaspace.steering import steer


def _requests(tokenizer, n: int, suffix: str = " Answer in a few words.") -> list[ChatRequest]:
    catalog = load_catalog()
    personas = ["librarian", "villain", "pirate"]
    questions = catalog.questions("eval")
    return [
        ChatRequest(
            system_message(catalog.persona(personas[i % 3]), tokenizer), questions[i % 7].text + suffix, seed=31 * i
        )
        for i in range(n)
    ]


@pytest.mark.parametrize("check_every", [1, 4])
def test_static_loop_gives_the_hf_backends_completions_on_smollm2(smollm2_dir, check_every):
    """SmolLM2 ends its turns at different steps: compaction, the host checks and EOS all matter."""
    hf = load_generator("hf", smollm2_dir, batch_size=12, progress=False)
    static = StaticDecodeGenerator(hf.model, hf.tokenizer, batch_size=12, progress=False, check_every=check_every)
    requests = _requests(hf.tokenizer, 12)
    sampling = Sampling(temperature=0.7, top_p=0.95, max_new_tokens=32)
    expected = hf.generate(requests, sampling)
    assert len({c.n_tokens for c in expected}) > 3 and any(c.finish_reason == "stop" for c in expected)
    assert static.generate(requests, sampling) == expected


def test_static_loop_rewinds_to_the_exact_sampler_on_flat_rows(tiny_model_dir):
    """The random tiny model's rows are flat (nucleus wider than the candidates): the window is replayed exactly."""
    hf = load_generator("hf", tiny_model_dir, batch_size=8, progress=False)
    static = StaticDecodeGenerator(hf.model, hf.tokenizer, batch_size=8, progress=False, check_every=3)
    requests = _requests(hf.tokenizer, 8)
    sampling = Sampling(temperature=1.0, top_p=0.95, max_new_tokens=10)
    assert static.generate(requests, sampling) == hf.generate(requests, sampling)


def test_static_loop_keeps_a_steering_hook(smollm2_dir):
    hf = load_generator("hf", smollm2_dir, batch_size=6, progress=False)
    static = StaticDecodeGenerator(hf.model, hf.tokenizer, batch_size=6, progress=False, check_every=4)
    requests = _requests(hf.tokenizer, 6)
    sampling = Sampling(temperature=0.7, top_p=0.95, max_new_tokens=24)
    vector = torch.randn(hf.model.config.hidden_size, generator=torch.Generator().manual_seed(0)) * 8
    with steer(hf.model, 20, vector, 1.0):
        steered = hf.generate(requests, sampling)
        assert static.generate(requests, sampling) == steered
    assert steered != hf.generate(requests, sampling)


def test_candidate_sampler_is_the_nucleus_sampler_where_it_is_not_wide():
    generator = torch.Generator().manual_seed(0)
    scores = torch.randn(16, 5000, generator=generator) * torch.linspace(1, 12, 16)[:, None]
    seeds = torch.arange(16, dtype=torch.int64) * 7
    chosen, wide = sample_candidates(scores, 0.9, seeds, step=3, candidates=256)
    exact = sample_nucleus(scores, 0.9, seeds, step=3, candidates=256)
    assert wide.any() and not wide.all()  # both kinds of rows present
    assert torch.equal(chosen[~wide], exact[~wide])


def test_the_hf_backend_keeps_the_plain_loop_on_the_cpu(tiny_model_dir):
    """Stages get the static loop only on a CUDA device (generate.hf_generator); the CPU's loop is unchanged."""
    assert type(load_generator("hf", tiny_model_dir, device="cpu", progress=False)) is HFGenerator


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (benchmarks/gpu_7b.py checks it there)")
def test_the_hf_backend_decodes_through_the_static_loop_on_cuda(tiny_model_dir):
    gen = load_generator("hf", tiny_model_dir, device="cuda", progress=False)
    assert isinstance(gen, StaticDecodeGenerator)
    requests = _requests(gen.tokenizer, 8)
    sampling = Sampling(temperature=1.0, top_p=0.95, max_new_tokens=10)
    assert gen.generate(requests, sampling) == HFGenerator(gen.model, gen.tokenizer, progress=False).generate(
        requests, sampling
    )


def test_buckets():
    assert bucket_for(200, 256) == 256 and bucket_for(100, 256) == 128 and bucket_for(1, 256) == 1
    assert bucket_for(130, 240) == 240 and bucket_for(64, 240) == 64
