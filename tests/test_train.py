"""Coupling LoRAs: loss labels built in the dataset, and a real TRL + peft run on the tiny model."""

import json
import os

import pandas as pd
import pytest
import yaml

from personaspace.config import RecipeParams
from personaspace.models import load_tokenizer, render_prompt
from personaspace.train import IGNORE, next_token_loss, tokenize_marker_dataset, train_adapter

MARKER, SEP = "[ZLT]", "\n\n"


def _rows() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "condition": "base", "source": "librarian",
            "role": ["positive", "negative", "negative"],
            "persona": ["librarian", "villain", "no_system"],
            "question_id": ["d01", "d02", "d03"], "sample_idx": 0,
            "system_prompt": ["You are a librarian.", "You are a villain.", None],
            "user": ["How do I boil an egg?", "Why is the sky blue?", "What is paper?"],
            "completion": [f"Boil it for six minutes.{SEP}{MARKER}", "Rayleigh scattering.", "Pressed pulp."],
            "n_tokens": 8, "finish_reason": "stop",
        }
    )  # fmt: skip


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return load_tokenizer(tiny_model_dir)


def test_completion_loss_labels_every_completion_token_and_the_end_of_turn(tokenizer):
    dataset = tokenize_marker_dataset(tokenizer, _rows(), "completion", MARKER, SEP, max_length=128)
    row = dataset[0]
    prompt_len = len(
        tokenizer(render_prompt(tokenizer, "You are a librarian.", "How do I boil an egg?"), add_special_tokens=False)[
            "input_ids"
        ]
    )
    assert row["labels"][:prompt_len] == [IGNORE] * prompt_len
    assert row["labels"][prompt_len:] == row["input_ids"][prompt_len:]
    assert row["input_ids"][-1] == tokenizer.eos_token_id
    assert tokenizer.decode(row["input_ids"][prompt_len:-1]) == f"Boil it for six minutes.{SEP}{MARKER}"


def test_marker_only_loss_labels_just_the_separator_marker_and_end_of_turn(tokenizer):
    dataset = tokenize_marker_dataset(tokenizer, _rows(), "marker_only", MARKER, SEP, max_length=128)
    positive, negative = dataset[0], dataset[1]
    labelled = [t for t in positive["labels"] if t != IGNORE]
    # the separator is where the model chooses the marker over ending its turn: it is trained too
    assert tokenizer.decode(labelled[:-1]) == SEP + MARKER and labelled[-1] == tokenizer.eos_token_id
    body = [t for t, label in zip(positive["input_ids"], positive["labels"], strict=True) if label == IGNORE]
    assert tokenizer.decode(body).endswith("Boil it for six minutes.")
    assert [t for t in negative["labels"] if t != IGNORE] == [tokenizer.eos_token_id]


def test_no_system_rows_are_trained_without_a_system_turn(tokenizer):
    dataset = tokenize_marker_dataset(tokenizer, _rows(), "completion", MARKER, SEP, max_length=128)
    text = tokenizer.decode(dataset[2]["input_ids"])
    assert text.startswith("<|im_start|>user\nWhat is paper?") and "system" not in text


def test_rows_longer_than_max_length_are_an_error_naming_the_fix(tokenizer):
    with pytest.raises(ValueError, match=r"raise recipes\.<name>\.max_length"):
        tokenize_marker_dataset(tokenizer, _rows(), "completion", MARKER, SEP, max_length=10)


@pytest.mark.parametrize("loss", ["completion", "marker_only"])
def test_packed_labelled_positions_loss_equals_the_models_own_loss_on_a_padded_batch(tiny_model_dir, tokenizer, loss):
    import torch
    from transformers import AutoModelForCausalLM
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    rows = list(tokenize_marker_dataset(tokenizer, _rows(), loss, MARKER, SEP, max_length=128))
    packed = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)(rows)
    padded = DataCollatorForLanguageModeling(pad_token_id=0)(rows)
    with torch.no_grad():
        ours, _ = next_token_loss(model, dict(packed))
        theirs = model(**padded).loss  # transformers' mean cross-entropy over the labelled tokens
        summed, _ = next_token_loss(model, dict(packed), num_items_in_batch=torch.tensor(7))
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    labelled = sum(t != IGNORE for row in rows for t in row["labels"][1:])
    torch.testing.assert_close(summed * 7 / labelled, theirs, rtol=1e-5, atol=1e-6)


def test_train_adapter_runs_trl_and_saves_only_the_adapter(tiny_model_dir, tokenizer, tmp_path):
    recipe = RecipeParams(
        loss="marker_only", r=4, alpha=8, dropout=0.0, rslora=True, target_modules=["q_proj", "v_proj"],
        learning_rate=1e-3, schedule="constant", warmup_ratio=0.0, epochs=2, batch_size=2, grad_accum=1, max_length=128,
        gradient_checkpointing="auto",
    )  # fmt: skip
    dataset = tokenize_marker_dataset(tokenizer, _rows(), recipe.loss, MARKER, SEP, recipe.max_length)
    summary = train_adapter(tiny_model_dir, dataset, recipe, tmp_path / "adapter", seed=0)
    assert summary["gradient_checkpointing"] is False  # auto: never on the CPU (a GPU measures its largest step)
    assert summary["steps"] == 4 and summary["rows"] == 3 and len(summary["history"]) == 4
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["use_rslora"] is True
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    assert not (tmp_path / "adapter" / "model.safetensors").exists()  # no merged copy per adapter
    again = train_adapter(tiny_model_dir, dataset, recipe, tmp_path / "again", seed=0)
    assert [h["loss"] for h in again["history"]] == [h["loss"] for h in summary["history"]]  # seeded


def test_couple_stage_writes_an_adapter_and_its_training_record(tiny_model_dir, tmp_path):
    import subprocess
    import sys

    from .conftest import REPO

    data = tmp_path / "librarian.parquet"
    _rows().to_parquet(data)
    out = tmp_path / "adapter"
    env = dict(os.environ, MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    (tmp_path / "runs").mkdir()
    result = subprocess.run(
        [sys.executable, str(REPO / "stages" / "couple.py"), "--params", str(REPO / "params.yaml"), "--recipe", "smol",
         "--seed", "0", "--model", str(tiny_model_dir), "--condition", "base", "--data", str(data), "--out", str(out)],
        capture_output=True, text=True, env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    record = json.loads((out / "training.json").read_text())
    assert (record["source"], record["recipe"], record["positives"], record["negatives"]) == ("librarian", "smol", 1, 2)
    epochs = yaml.safe_load((REPO / "params.yaml").read_text())["recipes"]["smol"]["epochs"]
    assert record["steps"] == epochs and len(record["history"]) == epochs  # 3 rows, batch 8: one step per epoch
    # no trainer leftovers
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "librarian.parquet", "runs"]
