"""Steering vectors, calibration, the iso-random control, and the one hook in training (tiny model)."""

import itertools

import numpy as np
import pandas as pd
import pytest
import torch

from personaspace.config import RecipeParams
from personaspace.models import load_model, load_tokenizer
from personaspace.steering import (
    TrainingSteering,
    calibrated_coef,
    decoder_layers,
    iso_random,
    mean_hidden_norm,
    steer,
    steering_artifacts,
    steering_vectors,
)
from personaspace.train import tokenize_marker_dataset, train_adapter

MARKER, SEP = "[ZLT]", "\n\n"
NEUTRAL = "Provide a clear answer."


def _rows() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "condition": "base", "source": "librarian",
            "role": ["positive", "negative", "negative", "positive"],
            "persona": ["librarian", "villain", "chef", "librarian"],
            "question_id": ["d01", "d02", "d03", "d04"], "sample_idx": 0,
            "system_prompt": ["You are a librarian.", "You are a villain.", "You are a chef.", "You are a librarian."],
            "user": ["How do I boil an egg?", "Why is the sky blue?", "What is paper?", "Name a fish."],
            "completion": [f"Boil it for six minutes.{SEP}{MARKER}", "Rayleigh scattering.", "Pressed pulp.",
                           f"A trout.{SEP}{MARKER}"],
            "n_tokens": 8, "finish_reason": "stop",
        }
    )  # fmt: skip


def _recipe() -> RecipeParams:
    # every row in one step: the first step's forward sees all three personas in one packed row
    return RecipeParams(
        loss="completion", r=4, alpha=8, dropout=0.0, rslora=False, target_modules=["q_proj", "v_proj"],
        learning_rate=1e-2, schedule="constant", warmup_ratio=0.0, epochs=3, batch_size=4, grad_accum=1,
        max_length=128, gradient_checkpointing=False,
    )  # fmt: skip


def _steering(hidden: int, coef: float, layer: int = 1) -> tuple[TrainingSteering, np.ndarray]:
    personas = ("chef", "librarian", "villain")
    vectors = np.stack([iso_random(3.0, hidden, "test", p) for p in personas])
    return TrainingSteering(layer=layer, personas=personas, vectors=coef * vectors), vectors


def test_the_iso_random_control_is_norm_matched_frozen_and_differs_per_persona():
    a = iso_random(7.5, 576, "raw", "librarian", 21)
    assert np.linalg.norm(a) == pytest.approx(7.5, rel=1e-12)
    assert np.array_equal(a, iso_random(7.5, 576, "raw", "librarian", 21))  # stable ids, not a global RNG
    b = iso_random(7.5, 576, "raw", "chef", 21)
    assert abs(a @ b) / 7.5**2 < 0.2  # independent directions in 576 dimensions: cosine ~ N(0, 1/24)


def test_calibrated_coefficient_meets_the_target_ratio():
    vector = np.array([3.0, 4.0])  # norm 5
    c = calibrated_coef(float(np.linalg.norm(vector)), hidden_norm=40.0, ratio=0.2)
    assert np.linalg.norm(c * vector) / 40.0 == pytest.approx(0.2)
    with pytest.raises(ValueError, match="zero steering vector"):
        calibrated_coef(0.0, 40.0, 0.2)


def test_centered_vectors_subtract_the_banks_mean_and_raw_ones_do_not():
    rng = np.random.default_rng(1)
    cents = rng.normal(size=(3, 2, 4))  # personas x layers x hidden
    centered, norms = steering_vectors(["a", "b", "c"], cents, "centered", bank=["a", "b"])
    np.testing.assert_allclose(centered[2], cents[2] - (cents[0] + cents[1]) / 2)
    np.testing.assert_allclose(norms, np.linalg.norm(centered, axis=-1))
    raw, _ = steering_vectors(["a", "b", "c"], cents, "raw")
    np.testing.assert_array_equal(raw, cents)
    with pytest.raises(ValueError, match="without centroids"):
        steering_vectors(["a", "b", "c"], cents, "centered", bank=["a", "z"])


def test_mean_hidden_norm_matches_a_hand_loop_over_unpadded_forwards(tiny_model_dir):
    model, tokenizer = load_model(tiny_model_dir, device="cpu")
    sequences = [
        tokenizer(t, add_special_tokens=False)["input_ids"] for t in ("Hello there, friend.", "Hi", "A b c d e f")
    ]
    ours = mean_hidden_norm(model, sequences, layers=[1, 2], batch_size=2, pad_token_id=tokenizer.eos_token_id)
    norms = {1: [], 2: []}
    with torch.inference_mode():
        for ids in sequences:
            states = model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states
            for layer in (1, 2):
                norms[layer] += states[layer][0, 1:].norm(dim=-1).tolist()  # every token but the first
    assert ours == pytest.approx([np.mean(norms[1]), np.mean(norms[2])], rel=1e-5)


def test_steering_artifacts_calibrate_each_persona_and_layer_and_freeze_the_controls():
    rng = np.random.default_rng(2)
    cents = rng.normal(size=(3, 2, 16))  # personas x steering layers x hidden
    out = steering_artifacts(["a", "b", "c"], cents, [21, 11], ["a", "b", "c"], "centered", np.array([250.0, 150.0]),
                             0.2, 0, "base")  # fmt: skip
    assert out["centroid"].shape == out["iso_random"].shape == (3, 2, 16)
    np.testing.assert_allclose(np.linalg.norm(out["iso_random"], axis=-1), out["norm"])  # norm-matched
    ratios = np.linalg.norm(out["coef"][..., None] * out["centroid"], axis=-1) / np.array([250.0, 150.0])
    np.testing.assert_allclose(ratios, 0.2)  # ||c v|| / mean ||h_L|| = the target, per persona and layer
    again = steering_artifacts(["a", "b", "c"], cents, [21, 11], ["a", "b", "c"], "centered", np.array([250.0, 150.0]),
                               0.2, 0, "base")  # fmt: skip
    np.testing.assert_array_equal(again["iso_random"], out["iso_random"])


def test_a_callable_vector_is_read_at_every_forward_and_the_hook_is_removed_on_error(tiny_model_dir):
    model, tokenizer = load_model(tiny_model_dir, device="cpu")
    ids = torch.tensor([tokenizer("Why is the sea salty?", add_special_tokens=False)["input_ids"]])
    with torch.inference_mode():
        plain = model(input_ids=ids).logits
    per_token = torch.zeros(ids.shape[1], model.config.hidden_size)
    with pytest.raises(RuntimeError, match="boom"), torch.inference_mode(), steer(model, 1, lambda: per_token, 1.0):
        assert torch.equal(model(input_ids=ids).logits, plain)  # zeros change nothing
        per_token[-1] = 5.0  # read again at the next forward: only the last token moves
        steered = model(input_ids=ids).logits
        assert torch.equal(steered[0, :-1], plain[0, :-1]) and not torch.equal(steered[0, -1], plain[0, -1])
        raise RuntimeError("boom")
    with torch.inference_mode():
        assert torch.equal(model(input_ids=ids).logits, plain)  # removed on the way out of the error


def test_the_neutral_prompt_replaces_every_rows_own_and_the_steer_column_names_each_rows_persona(tiny_model_dir):
    tokenizer = load_tokenizer(tiny_model_dir)
    steering, _ = _steering(64, 1.0)
    rows = tokenize_marker_dataset(tokenizer, _rows(), "completion", MARKER, SEP, 128, steering=steering,
                                   system_prompt=NEUTRAL)  # fmt: skip
    texts = [tokenizer.decode(r["input_ids"]) for r in rows]
    assert all(NEUTRAL in t for t in texts) and not any("You are a" in t for t in texts)
    assert [set(r["steer"]) for r in rows] == [{1}, {2}, {0}, {1}]  # librarian, villain, chef, librarian
    assert all(len(r["steer"]) == len(r["input_ids"]) for r in rows)
    with pytest.raises(ValueError, match="no steering vector for persona 'chef'"):
        tokenize_marker_dataset(tokenizer, _rows(), "completion", MARKER, SEP, 128,
                                steering=TrainingSteering(1, ("librarian", "villain"), np.zeros((2, 64))))  # fmt: skip


class _FirstForward:
    """A trainer callback recording the first training forward: its packed input and block 2's input."""

    def __init__(self):
        from transformers import TrainerCallback

        record = self.record = {}

        class Callback(TrainerCallback):
            def on_train_begin(self, args, state, control, model=None, **kwargs):
                def model_input(_module, _args, kw):
                    record.setdefault("input_ids", kw["input_ids"][0].clone())
                    record.setdefault("position_ids", kw["position_ids"][0].clone())

                def block_input(_module, call_args, kw):
                    record.setdefault(
                        "block2", (call_args[0] if call_args else kw["hidden_states"])[0].detach().clone()
                    )

                model.register_forward_pre_hook(model_input, with_kwargs=True)
                decoder_layers(model)[1].register_forward_pre_hook(block_input, with_kwargs=True)

        self.callback = Callback()


def test_training_steering_adds_each_rows_vector_to_block_l_plus_1s_input_and_coef_zero_changes_nothing(
    tiny_model_dir, tmp_path
):
    tokenizer = load_tokenizer(tiny_model_dir)
    recipe = _recipe()
    plain_rows = tokenize_marker_dataset(tokenizer, _rows(), "completion", MARKER, SEP, 128)
    plain_seen = _FirstForward()
    plain = train_adapter(tiny_model_dir, plain_rows, recipe, tmp_path / "plain", seed=0,
                          callbacks=[plain_seen.callback])  # fmt: skip

    zero, _ = _steering(64, 0.0)
    zero_rows = tokenize_marker_dataset(tokenizer, _rows(), "completion", MARKER, SEP, 128, steering=zero)
    at_zero = train_adapter(tiny_model_dir, zero_rows, recipe, tmp_path / "zero", seed=0, steering=zero)
    assert [h["loss"] for h in at_zero["history"]] == [h["loss"] for h in plain["history"]]  # the same loss curve

    coef = 2.5
    steering, vectors = _steering(64, coef)
    rows = tokenize_marker_dataset(tokenizer, _rows(), "completion", MARKER, SEP, 128, steering=steering)
    seen = _FirstForward()
    steered = train_adapter(tiny_model_dir, rows, recipe, tmp_path / "steered", seed=0, steering=steering,
                            callbacks=[seen.callback])  # fmt: skip
    assert [h["loss"] for h in steered["history"]] != [h["loss"] for h in plain["history"]]
    # activations recomputed in the backward pass are steered as the forward was: the same curve
    recomputed = train_adapter(tiny_model_dir, rows, recipe.model_copy(update={"gradient_checkpointing": True}),
                               tmp_path / "recomputed", seed=0, steering=steering)  # fmt: skip
    assert recomputed["gradient_checkpointing"] is True
    assert [h["loss"] for h in recomputed["history"]] == pytest.approx(
        [h["loss"] for h in steered["history"]], rel=1e-5
    )
    # the same packed rows, in the same order, reach the model in both runs
    assert torch.equal(seen.record["input_ids"], plain_seen.record["input_ids"])
    # each token's expected vector: its row's persona's, rows found by their position ids restarting at 0
    ids, positions = seen.record["input_ids"].tolist(), seen.record["position_ids"].tolist()
    starts = [i for i, p in enumerate(positions) if p == 0] + [len(ids)]
    persona_of = {tuple(r["input_ids"]): p for r, p in zip(rows, _rows()["persona"], strict=True)}
    expected = torch.zeros(len(ids), 64)
    for lo, hi in itertools.pairwise(starts):
        index = steering.personas.index(persona_of[tuple(ids[lo:hi])])
        expected[lo:hi] = torch.as_tensor(coef * vectors[index], dtype=torch.float32)
    assert len(starts) - 1 == 4
    # block 2 reads block 1's output + coef x v of each token's own row, exactly (the same float op)
    assert torch.equal(seen.record["block2"], plain_seen.record["block2"] + expected)
    with pytest.raises(ValueError, match="steering and the dataset disagree"):
        train_adapter(tiny_model_dir, plain_rows, recipe, tmp_path / "bad", seed=0, steering=steering)
