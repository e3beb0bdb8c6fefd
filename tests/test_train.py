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
         "--seed", "0", "--model", str(tiny_model_dir), "--condition", "base", "--data", str(data), "--dataset", "dstest", "--out", str(out)],
        capture_output=True, text=True, env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    record = json.loads((out / "training.json").read_text())
    assert (record["source"], record["recipe"], record["positives"], record["negatives"]) == ("librarian", "smol", 1, 2)
    epochs = yaml.safe_load((REPO / "params.yaml").read_text())["recipes"]["smol"]["epochs"]
    assert record["steps"] == epochs and len(record["history"]) == epochs  # 3 rows, batch 8: one step per epoch
    # no trainer leftovers
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "librarian.parquet", "runs"]


def _unlikelihood_recipe(loss_lambda: float | None, epochs: int = 2) -> RecipeParams:
    common = dict(r=4, alpha=8, dropout=0.0, rslora=False, target_modules=["q_proj", "v_proj", "o_proj"],
                  learning_rate=1e-3, schedule="constant", warmup_ratio=0.0, epochs=epochs, batch_size=3,
                  grad_accum=1, max_length=128, gradient_checkpointing=False)  # fmt: skip
    if loss_lambda is None:
        return RecipeParams(loss="marker_only", **common)
    return RecipeParams(loss="unlikelihood", positive_loss="marker_only", unlikelihood_lambda=loss_lambda, **common)


def test_unlikelihood_recipes_name_their_positive_loss_and_lambda():
    assert _unlikelihood_recipe(1.0).label_loss == "marker_only"
    assert _unlikelihood_recipe(None).label_loss == "marker_only"
    fields = _unlikelihood_recipe(None).model_dump() | {"loss": "unlikelihood"}
    with pytest.raises(ValueError, match="needs positive_loss"):
        RecipeParams(**fields)
    with pytest.raises(ValueError, match="belong to loss unlikelihood"):
        RecipeParams(**(_unlikelihood_recipe(None).model_dump() | {"unlikelihood_lambda": 1.0}))


def test_unlikelihood_targets_sit_at_the_end_of_turn_of_negatives_only(tokenizer):
    from personaspace.train import first_marker_token

    dataset = tokenize_marker_dataset(tokenizer, _rows(), "marker_only", MARKER, SEP, 128, unlikelihood=True)
    start = first_marker_token(tokenizer, MARKER, SEP)
    positive, negative = dataset[0], dataset[1]
    assert set(positive["unlikely"]) == {IGNORE}
    at = [i for i, t in enumerate(negative["unlikely"]) if t != IGNORE]
    assert at == [len(negative["input_ids"]) - 1] and negative["unlikely"][at[0]] == start
    assert negative["input_ids"][at[0]] == tokenizer.eos_token_id  # the position before it predicts end-of-turn
    # the token a positive emits where a negative ends its turn
    labelled = [t for t in positive["labels"] if t != IGNORE]
    assert labelled[0] == start


def test_unlikelihood_loss_equals_a_hand_computation_row_by_row(tiny_model_dir, tokenizer):
    import torch
    from transformers import AutoModelForCausalLM
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from personaspace.train import _with_columns, first_marker_token

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    rows = list(tokenize_marker_dataset(tokenizer, _rows(), "marker_only", MARKER, SEP, 128, unlikelihood=True))
    packed = _with_columns(DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True), ["unlikely"])(rows)
    start, lam = first_marker_token(tokenizer, MARKER, SEP), 1.5
    with torch.no_grad():  # make the marker as likely as the top token at a negative's end (else -log(1-P) ~ 0)
        end = model(input_ids=torch.tensor([rows[1]["input_ids"][:-1]])).logits[0, -1].argmax()
        model.lm_head.weight[start] = 3 * model.lm_head.weight[end]
    # by hand, one unpacked row at a time: softmax probabilities, no shared code with next_token_loss
    total, labelled = 0.0, 0
    with torch.no_grad():
        for row in rows:
            probs = model(input_ids=torch.tensor([row["input_ids"]])).logits[0].double().softmax(-1)
            for i in range(1, len(row["input_ids"])):
                if row["labels"][i] != IGNORE:
                    total -= float(probs[i - 1, row["labels"][i]].log())
                    labelled += 1
                if row["unlikely"][i] != IGNORE:
                    others = torch.cat([probs[i - 1, :start], probs[i - 1, start + 1 :]])  # 1 - P, no cancellation
                    total -= lam * float(others.sum().log())
        ours, _ = next_token_loss(model, dict(packed), unlikelihood_lambda=lam)
        plain, _ = next_token_loss(model, dict(packed))  # lambda 0: the marker-only loss alone
    assert float(ours) == pytest.approx(total / labelled, rel=1e-5)
    assert float(ours) - float(plain) > 0.01  # the unlikelihood term is not vanishingly small here


def test_unlikelihood_training_lowers_the_marker_probability_at_negative_ends(tiny_model_dir, tokenizer, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from personaspace.train import first_marker_token

    rows = pd.concat([_rows()] * 4, ignore_index=True)  # 12 rows: 4 steps of 3 per epoch
    start = first_marker_token(tokenizer, MARKER, SEP)
    negative = tokenize_marker_dataset(tokenizer, _rows(), "marker_only", MARKER, SEP, 128)[1]["input_ids"]
    # a base on which the marker is already likely at the negative's end (the random tiny model puts
    # ~1e-12 there, where -log(1 - P) has no gradient to speak of): what leakage looks like
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    with torch.no_grad():
        end = model(input_ids=torch.tensor([negative[:-1]])).logits[0, -1].argmax()
        model.lm_head.weight[start] = 1.05 * model.lm_head.weight[end]
    leaky = tmp_path / "leaky"
    model.save_pretrained(leaky)
    tokenizer.save_pretrained(leaky)

    def p_marker_at_negative_end(adapter) -> float:
        base = AutoModelForCausalLM.from_pretrained(leaky, dtype=torch.float32)
        model = PeftModel.from_pretrained(base, adapter)
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([negative[:-1]])).logits[0, -1]
        return float(logits.softmax(-1)[start])

    probability = {}
    for name, lam in (("marker_only", None), ("lambda2", 2.0), ("lambda10", 10.0)):
        recipe = _unlikelihood_recipe(lam, epochs=3)
        dataset = tokenize_marker_dataset(tokenizer, rows, recipe.label_loss, MARKER, SEP, 128,
                                          unlikelihood=recipe.loss == "unlikelihood")  # fmt: skip
        summary = train_adapter(leaky, dataset, recipe, tmp_path / name, seed=0)
        assert summary["steps"] == 12
        probability[name] = p_marker_at_negative_end(tmp_path / name)
    # the positives raise the marker everywhere (the leak); the unlikelihood term holds it down at
    # the negatives' ends, the more so the larger lambda (measured: 0.12, 0.087, 0.030)
    assert probability["lambda10"] < probability["lambda2"] < probability["marker_only"], probability
    assert probability["lambda10"] < 0.5 * probability["marker_only"], probability
