"""Chat formatting conventions, and the real embedded SmolLM2 loaded offline."""

import pytest
import torch

from personaspace.completions import system_message
from personaspace.generate import ChatRequest, Sampling, load_generator
from personaspace.models import load_model, model_default_system_prompt, render_prompt
from personaspace.personas import load_catalog

SMOLLM_DEFAULT = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
QWEN_DEFAULT = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
# Qwen2.5-Instruct's injection logic (its tool-calling branches left out).
QWEN_LIKE_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>system\\n" + QWEN_DEFAULT + "<|im_end|>\\n' }}{%- endif %}"
    "{%- for message in messages %}{%- if not (message.role == 'system' and loop.first) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
PLAIN_CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


@pytest.fixture
def tokenizer(tiny_model_dir):
    return load_model(tiny_model_dir)[1]


def test_qwen_style_injected_default_is_read_and_no_system_really_has_none(tokenizer):
    tokenizer.chat_template = QWEN_LIKE_TEMPLATE
    assert model_default_system_prompt(tokenizer) == QWEN_DEFAULT
    assert render_prompt(tokenizer, None, "Hi") == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert QWEN_DEFAULT in tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False)


def test_a_template_that_injects_nothing_is_rendered_as_is(tokenizer):
    tokenizer.chat_template = PLAIN_CHATML
    assert model_default_system_prompt(tokenizer) is None
    assert render_prompt(tokenizer, None, "Hi") == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    with pytest.raises(ValueError, match="no"):
        system_message(load_catalog().persona("model_default"), tokenizer)


@pytest.mark.slow
def test_smollm2_template_injects_its_default_and_no_system_removes_it(smollm2_dir):
    """Documents SmolLM2's template: with no system message it inserts SMOLLM_DEFAULT."""
    _, tokenizer = load_model(smollm2_dir, device="cpu")
    bare = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
    )
    assert bare.startswith(f"<|im_start|>system\n{SMOLLM_DEFAULT}<|im_end|>\n")
    assert model_default_system_prompt(tokenizer) == SMOLLM_DEFAULT
    prompt = render_prompt(tokenizer, None, "Hi")
    assert prompt == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert ids.count(tokenizer.convert_tokens_to_ids("<|im_start|>")) == 2  # user + assistant turns only
    catalog = load_catalog()
    assert system_message(catalog.persona("model_default"), tokenizer) == SMOLLM_DEFAULT
    assert system_message(catalog.persona("no_system"), tokenizer) is None


@pytest.mark.slow
def test_embedded_smollm2_loads_offline_and_answers_a_system_user_chat(smollm2_dir, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    generator = load_generator("hf", smollm2_dir, device="cpu", progress=False)
    assert generator.model.config.num_hidden_layers == 30 and generator.model.dtype == torch.float32
    question = "What is the capital of France? Answer in one sentence."
    greedy = generator.generate([ChatRequest("You are a librarian.", question, seed=0)], Sampling(1e-6, 1.0, 64))[0]
    assert greedy.finish_reason == "stop" and "paris" in greedy.text.lower()
    # Sampled at T=0.7 a 135M model sometimes invents a capital; most samples still answer Paris.
    requests = [ChatRequest("You are a librarian.", question, seed=seed) for seed in range(8)]
    sampled = generator.generate(requests, Sampling(temperature=0.7, top_p=0.95, max_new_tokens=64))
    assert all(c.finish_reason == "stop" and 1 < c.n_tokens < 64 for c in sampled)
    assert sum("paris" in c.text.lower() for c in sampled) >= 4


@pytest.mark.slow
def test_smollm2_decode_loop_matches_greedy_generate_across_rows_that_stop_early(smollm2_dir):
    generator = load_generator("hf", smollm2_dir, device="cpu", progress=False)
    tokenizer, model = generator.tokenizer, generator.model
    requests = [
        ChatRequest("You are a librarian.", "Say hello.", seed=0),
        ChatRequest(None, "Name three colours. Answer in one sentence.", seed=1),
        ChatRequest("You are a pirate.", "Why is the sea salty? Answer in two sentences.", seed=2),
    ]
    ours = generator.generate(requests, Sampling(temperature=1e-6, top_p=1.0, max_new_tokens=40))
    assert {c.finish_reason for c in ours} == {"stop"} or len({c.n_tokens for c in ours}) > 1
    prompts = [render_prompt(tokenizer, r.system, r.user) for r in requests]
    enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.inference_mode():
        out = model.generate(**enc, do_sample=False, max_new_tokens=40)
    for row, completion in enumerate(ours):
        ids = out[row, enc["input_ids"].shape[1] :].tolist()
        end = ids.index(2) if 2 in ids else len(ids)
        assert completion.text == tokenizer.decode(ids[:end], skip_special_tokens=True).strip()
        assert completion.n_tokens == (end + 1 if end < len(ids) else len(ids))
