"""The hf backend on a tiny random-init model: seeded per-row sampling, batching, table fields."""

from dataclasses import replace

import numpy as np
import pytest
import torch
from scipy import stats

from personaspace.completions import COMPLETION_COLUMNS, sample_persona_completions
from personaspace.generate import (
    ChatRequest,
    Sampling,
    counter_uniforms,
    load_generator,
    sample_nucleus,
    sample_rows,
    top_p_filter,
)
from personaspace.personas import load_catalog
from personaspace.seeds import stable_seed


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return load_generator("hf", tiny_model_dir, batch_size=4, progress=False)


def _splitmix64_reference(seed: int, step: int, token: int) -> float:
    """SplitMix64 in plain Python integers (mod 2**64), the independent check of the tensor version."""
    mask, gamma = (1 << 64) - 1, 0x9E3779B97F4A7C15

    def mix(z: int) -> int:
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        return z ^ (z >> 31)

    key = mix((seed * gamma + step) & mask)
    return ((mix((key + (token + 1) * gamma) & mask) >> 11) + 0.5) / 2**53


def test_counter_uniforms_match_a_plain_python_splitmix64():
    seeds = torch.tensor([0, 12345, 2**62 + 7, stable_seed(0, "datagen", "librarian")], dtype=torch.int64)
    uniforms = counter_uniforms(seeds, step=3, vocab=50)
    for row, seed in enumerate(seeds.tolist()):
        for token in (0, 1, 49):
            assert uniforms[row, token].item() == _splitmix64_reference(seed, 3, token)
    assert counter_uniforms(seeds[1:2], 3, 50).equal(uniforms[1:2])  # a row does not depend on its batch


def test_row_sampler_draws_from_the_softmax():
    logits = torch.tensor([2.0, 1.0, 0.5, -1.0, float("-inf")])
    seeds = torch.arange(20000, dtype=torch.int64)
    draws = sample_rows(logits.expand(len(seeds), -1), seeds, step=0).numpy()
    counts = np.bincount(draws, minlength=5)
    expected = torch.softmax(logits.double(), -1).numpy() * len(draws)
    assert counts[4] == 0  # a filtered token is never drawn
    assert stats.chisquare(counts[:4], expected[:4]).pvalue > 1e-3


def test_a_completion_depends_on_its_seed_not_on_its_batch(tiny):
    sampling = Sampling(temperature=1.0, top_p=0.95, max_new_tokens=12)
    target = ChatRequest("You are a librarian.", "How do I boil an egg?", seed=123)
    others = [ChatRequest(None, "Hi", seed=1), ChatRequest("You are a pirate captain at sea.", "Why?", seed=2)]
    alone = tiny.generate([target], sampling)[0]
    batched = tiny.generate([*others, target], sampling)[2]
    assert alone == batched
    assert tiny.generate([ChatRequest(target.system, target.user, seed=124)], sampling)[0] != alone


def test_decode_loop_matches_transformers_greedy_generate(tiny):
    """Near-zero temperature makes sampling greedy: the cache-pruning loop must equal HF's generate."""
    requests = [
        ChatRequest(None, "Hi", seed=0),
        ChatRequest("You are a knight of the realm.", "Why is the sky blue?", 1),
    ]
    ours = tiny.generate(requests, Sampling(temperature=1e-6, top_p=1.0, max_new_tokens=10))
    from personaspace.models import render_prompt

    tokenizer, model = tiny.tokenizer, tiny.model
    prompts = [render_prompt(tokenizer, r.system, r.user) for r in requests]
    enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.inference_mode():
        out = model.generate(**enc, do_sample=False, max_new_tokens=10, pad_token_id=tokenizer.pad_token_id)
    for row, completion in enumerate(ours):
        ids = out[row, enc["input_ids"].shape[1] :].tolist()[: completion.n_tokens]
        assert completion.text == tokenizer.decode(ids, skip_special_tokens=True).strip()


def test_completion_table_has_every_id_and_flags_truncation(tiny):
    catalog = load_catalog()
    table = sample_persona_completions(
        tiny, tiny.tokenizer, catalog, "no_system", bank="eval", samples_per_question=2,
        sampling=Sampling(0.7, 0.95, 6), user_suffix=" Briefly.", study_seed=0, condition="base", marker="[ZLT]",
    )  # fmt: skip
    assert list(table.columns) == COMPLETION_COLUMNS
    assert len(table) == 2 * len(catalog.questions("eval"))
    assert table["system_prompt"].isna().all()
    assert table["user"].str.endswith(" Briefly.").all()
    assert table["seed"].is_unique
    # A random-init model never ends its turn: every row hits the limit and says so.
    assert (table["finish_reason"] == "length").all() and (table["n_tokens"] == 6).all()


@pytest.mark.parametrize("scale", [0.1, 1.0, 3.0, 10.0])
@pytest.mark.parametrize("top_p", [0.5, 0.9, 0.95])
def test_top_p_filter_keeps_the_same_tokens_as_transformers_warper(scale, top_p):
    import torch
    from transformers import TopPLogitsWarper

    torch.manual_seed(0)
    scores = torch.randn(16, 5000) * scale  # small scales give flat rows whose nucleus exceeds the candidates
    expected = TopPLogitsWarper(top_p)(None, scores.clone())
    got = top_p_filter(scores, top_p, candidates=64)
    assert torch.equal(torch.isfinite(got), torch.isfinite(expected))
    assert torch.equal(got[torch.isfinite(got)], scores[torch.isfinite(got)])


@pytest.mark.parametrize("scale", [0.1, 1.0, 3.0, 10.0])
@pytest.mark.parametrize("top_p", [0.5, 0.95, 1.0])
def test_sparse_nucleus_sampling_draws_what_the_dense_filter_and_sampler_draw(scale, top_p):
    import torch

    torch.manual_seed(1)
    scores = torch.randn(32, 5000) * scale  # flat rows (small scale) take the dense fallback
    seeds = torch.arange(100, 132, dtype=torch.int64)
    for step in range(3):
        dense = sample_rows(top_p_filter(scores, top_p, candidates=64), seeds, step)
        assert torch.equal(sample_nucleus(scores, top_p, seeds, step, candidates=64), dense)


def test_a_shared_system_prompt_is_run_once_and_gives_each_prompts_own_logits(tiny):
    """The two-pass prefill (shared prefix once, then each rest on its cache) equals whole prompts run alone."""
    from personaspace.models import render_prompt

    questions = ["Hi", "How do I boil an egg, step by step?", "Why is the sky blue?"]
    requests = [ChatRequest("You are a librarian.", q, seed=i) for i, q in enumerate(questions)]
    requests.append(ChatRequest(None, "Hello there", seed=9))
    tokenizer, model = tiny.tokenizer, tiny.model
    prompts = [render_prompt(tokenizer, r.system, r.user) for r in requests]
    ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    calls = []
    hook = model.register_forward_pre_hook(
        lambda _, args, kwargs: calls.append(kwargs["input_ids"].shape), with_kwargs=True
    )
    try:
        with torch.inference_mode():
            out, _, _, _ = tiny._prefill(model, ids, [r.system for r in requests])
            alone = [model(input_ids=torch.tensor([row])).logits[0, -1] for row in ids]
    finally:
        hook.remove()
    shared = next(n for n, column in enumerate(zip(*ids[:3], strict=False)) if len(set(column)) > 1)
    assert calls[0] == (2, max(shared, len(ids[3]) - 1))  # one row per distinct system prompt
    assert calls[1][1] == max(len(row) for row in ids[:3]) - shared  # the longest rest; padding masked
    for row, expected in enumerate(alone):
        assert torch.allclose(out.logits[row, -1], expected, rtol=1e-4, atol=1e-4)


def test_requests_carry_their_adapter_and_one_call_spans_several(tiny, tiny_model_dir, tmp_path):
    """One call with requests for the base and for an adapter gives what separate, unmerged loads give."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)  # random, non-zero B
    get_peft_model(model, lora).save_pretrained(tmp_path / "adapter")
    sampling = Sampling(temperature=1.0, top_p=0.95, max_new_tokens=6)
    plain = [ChatRequest("You are a librarian.", "Why is the sky blue?", seed=s) for s in range(3)]
    mixed = [*plain, *(replace(r, adapter=str(tmp_path / "adapter")) for r in plain)]
    together = tiny.generate(mixed, sampling)
    unmerged = load_generator("hf", tiny_model_dir, adapter=tmp_path / "adapter", batch_size=4, progress=False)
    assert together[:3] == tiny.generate(plain, sampling)
    assert [c.text for c in together[3:]] == [c.text for c in unmerged.generate(plain, sampling)]
    assert together[3:] != together[:3]


def test_a_steered_request_samples_as_the_hook_does_and_shares_no_batch_with_unsteered_ones(tiny):
    from personaspace.generate import Steering
    from personaspace.steering import steer

    sampling = Sampling(temperature=1.0, top_p=0.95, max_new_tokens=6)
    vector = tuple(np.random.default_rng(0).normal(size=tiny.model.config.hidden_size) * 30)
    steering = Steering("test/v", layer=1, coef=1.5, vector=vector)
    plain = [ChatRequest("You are a librarian.", f"Question {i}?", seed=i) for i in range(3)]
    steered = [replace(r, steering=steering) for r in plain]
    with steer(tiny.model, 1, list(vector), 1.5):
        by_hook = tiny.generate(plain, sampling)
    mixed = tiny.generate([*plain, *steered], sampling)  # one call, two batches: the steering is per batch
    assert mixed[3:] == by_hook
    assert mixed[:3] == tiny.generate(plain, sampling)
    assert mixed[:3] != mixed[3:]
