"""Eval cells cached by content: nothing sampled twice, growth samples only new cells, rates carry n."""

import hashlib
import json

import pandas as pd
import pytest

from personaspace.evaluation import CellStore, evaluate_cells, rate_matrix
from personaspace.fingerprints import fingerprint_dir
from personaspace.generate import Sampling, load_generator
from personaspace.personas import load_catalog
from personaspace.stats import wilson_interval

SAMPLING = Sampling(temperature=1.0, top_p=0.95, max_new_tokens=4)


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return load_generator("hf", tiny_model_dir, batch_size=64, progress=False), fingerprint_dir(tiny_model_dir)


def _evaluate(tiny, store, personas, marker="[ZLT]"):
    generator, fingerprint = tiny
    return evaluate_cells(
        generator, load_catalog(), personas, {"none": (None, fingerprint)}, condition="base", samples_per_question=1,
        sampling=SAMPLING, user_suffix=" Briefly.", study_seed=0, marker=marker, store=store,
    )  # fmt: skip


def test_cells_are_sampled_once_and_growth_samples_only_the_new_ones(tiny, tmp_path):
    store = CellStore(tmp_path / "cells")
    first, generated = _evaluate(tiny, store, ["librarian", "villain"])
    assert generated == 40 and len(first) == 40
    again, generated = _evaluate(tiny, store, ["librarian", "villain"])
    assert generated == 0
    pd.testing.assert_frame_equal(first, again)
    grown, generated = _evaluate(tiny, store, ["librarian", "villain", "pirate"])
    assert generated == 20 and len(grown) == 60
    pd.testing.assert_frame_equal(grown.iloc[:40].reset_index(drop=True), first)


def test_eval_says_which_adapter_runs_and_how_many_remain(tiny, tmp_path, capsys):
    """The generate bars of an eval did not say whose cells they sampled or how many adapters were left."""
    generator, fingerprint = tiny
    store = CellStore(tmp_path / "cells")
    adapters = {"none": (None, fingerprint), "twin": (None, fingerprint + "x")}
    kwargs = dict(condition="base", samples_per_question=1, sampling=SAMPLING, user_suffix="", study_seed=0,
                  marker="[ZLT]", store=store)  # fmt: skip
    evaluate_cells(generator, load_catalog(), ["librarian"], {"none": adapters["none"]}, **kwargs)
    capsys.readouterr()
    evaluate_cells(generator, load_catalog(), ["librarian", "villain"], adapters, **kwargs)
    assert capsys.readouterr().err.splitlines() == [
        "eval base: adapter 1 of 2, none: 20 cells to sample, 20 from the cell cache",
        "eval base: adapter 2 of 2, twin: 40 cells to sample, 0 from the cell cache",
    ]


def test_cells_of_another_sampler_are_not_reused(tiny, tmp_path):
    """Switching generation.backend samples anew: the hf backend's cells are not the vllm backend's."""
    generator, fingerprint = tiny

    class OtherSampler:
        tokenizer = generator.tokenizer
        sampler = "vllm"

        def generate(self, requests, sampling):
            return generator.generate(requests, sampling)

    store = CellStore(tmp_path / "cells")
    _evaluate(tiny, store, ["librarian"])
    _, generated = _evaluate((OtherSampler(), fingerprint), store, ["librarian"])
    assert generated == 20
    _, generated = _evaluate(tiny, store, ["librarian"])
    assert generated == 0


def test_a_killed_eval_resumes_from_the_finished_chunks(tiny, tmp_path):
    store = CellStore(tmp_path / "cells")
    _evaluate(tiny, store, ["librarian"])  # as if the run died after the first adapter-persona chunk
    _, generated = _evaluate(tiny, store, ["librarian", "comedian"])
    assert generated == 20
    assert not list((tmp_path / "cells").glob(".*"))  # no temporary leftovers beside the chunks


def test_rate_matrix_has_n_and_wilson_intervals():
    completions = pd.DataFrame({"adapter": ["a"] * 5 + ["b"] * 3, "persona": ["x"] * 5 + ["y"] * 3,
                                "fired": [True, True, False, False, False, True, True, True]})  # fmt: skip
    matrix = rate_matrix(completions, 0.95).set_index(["adapter", "persona"])
    assert (matrix.loc[("a", "x"), "fired"], matrix.loc[("a", "x"), "n"]) == (2, 5)
    low, high = wilson_interval(2, 5, 0.95)
    assert matrix.loc[("a", "x"), "wilson_low"] == pytest.approx(low) and matrix.loc[
        ("a", "x"), "wilson_high"
    ] == pytest.approx(high)
    assert matrix.loc[("b", "y"), "rate"] == 1.0


def test_fingerprint_follows_the_weights_not_the_training_record(tmp_path):
    (tmp_path / "adapter_model.safetensors").write_bytes(b"weights")
    (tmp_path / "training.json").write_text('{"seconds": 1.0}')
    before = fingerprint_dir(tmp_path)
    (tmp_path / "training.json").write_text('{"seconds": 2.0}')
    assert fingerprint_dir(tmp_path) == before
    (tmp_path / "adapter_model.safetensors").write_bytes(b"other")
    assert fingerprint_dir(tmp_path) != before


def test_an_adapter_edited_after_training_is_refused(tmp_path):
    """The record holds the fingerprint its training saw: one changed byte is named, not sampled from."""
    from personaspace.fingerprints import CacheError, record_fingerprint

    (tmp_path / "adapter_model.safetensors").write_bytes(b"weights")
    record = record_fingerprint(tmp_path, {"steps": 12})
    (tmp_path / "training.json").write_text(json.dumps(record))
    assert fingerprint_dir(tmp_path) == record["fingerprint"]
    (tmp_path / "adapter_model.safetensors").write_bytes(b"weighte")
    with pytest.raises(CacheError, match=r"changed after training wrote them.*dvc checkout"):
        fingerprint_dir(tmp_path)


def test_a_flipped_bit_in_a_cell_chunk_is_detected(tiny, tmp_path):
    """A chunk's name records the digest of its bytes; one flipped bit stops the eval with the chunk's name."""
    from personaspace.fingerprints import CacheError

    store = CellStore(tmp_path / "cells")
    _evaluate(tiny, store, ["librarian"])
    (chunk,) = (tmp_path / "cells").glob("*.parquet")
    assert CellStore(tmp_path / "cells").load()["cell_key"].nunique() == 20  # intact: read as written
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0x01
    chunk.write_bytes(bytes(data))
    with pytest.raises(CacheError, match=rf"{chunk.name}: its bytes hash to .* delete it"):
        CellStore(tmp_path / "cells").load()


def test_each_adapters_cells_are_stored_as_soon_as_it_is_done(tiny, tmp_path):
    """A crash while the second adapter samples keeps the first adapter's cells (the resume unit)."""
    generator, fingerprint = tiny

    class DiesOnSecondCall:
        tokenizer = generator.tokenizer
        sampler = generator.sampler

        def __init__(self):
            self.calls = 0

        def generate(self, requests, sampling):
            self.calls += 1
            if self.calls == 2:
                raise KeyboardInterrupt
            return generator.generate(requests, sampling)

    store = CellStore(tmp_path / "cells")
    adapters = {"none": (None, fingerprint), "other": (None, f"{fingerprint}:other")}
    settings = dict(condition="base", samples_per_question=1, sampling=SAMPLING, user_suffix="", study_seed=0,
                    marker="[ZLT]")  # fmt: skip
    with pytest.raises(KeyboardInterrupt):
        evaluate_cells(DiesOnSecondCall(), load_catalog(), ["librarian"], adapters, store=store, **settings)
    resumed = CellStore(tmp_path / "cells")
    _, generated = evaluate_cells(generator, load_catalog(), ["librarian"], adapters, store=resumed, **settings)
    assert generated == 20  # only the second adapter's cells


def test_a_steered_cell_is_never_served_from_its_unsteered_twin(tiny):
    import hashlib
    import json

    from personaspace.completions import persona_cells
    from personaspace.evaluation import cell_key
    from personaspace.generate import Steering

    generator, fingerprint = tiny

    def keys(steering=None, neutral=None):
        rows, requests = persona_cells(
            generator.tokenizer, load_catalog(), "librarian", bank="eval", samples_per_question=1, user_suffix="",
            study_seed=0, condition="base", stage="eval", adapter="none", neutral_prompt=neutral, steering=steering,
        )  # fmt: skip
        return rows, [cell_key(r, SAMPLING, fingerprint, "hf", q.steering) for r, q in zip(rows, requests, strict=True)]

    rows, plain = keys()
    # an unsteered key is the one from before steering existed: the same parts, hashed the same way
    row = rows[0]
    parts = ["hf", fingerprint, "none", row["system_prompt"], row["user"], row["seed"], 0, 1.0, 0.95, 4]
    assert plain[0] == hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()
    assert (row["steer_vector"], row["steer_layer"], row["steer_coef"]) == ("none", 0, 0.0)
    v = Steering("raw/librarian/centroid/L1", layer=1, coef=2.0, vector=(1.0, 0.0))
    steered_rows, steered = keys(v)
    assert (steered_rows[0]["steer_vector"], steered_rows[0]["steer_layer"], steered_rows[0]["steer_coef"]) == (
        "raw/librarian/centroid/L1", 1, 2.0,
    )  # fmt: skip
    assert [r["seed"] for r in steered_rows] == [r["seed"] for r in rows]  # common random numbers
    variants = [
        v,
        Steering(v.vector_id, 1, -2.0, v.vector),  # the sign check
        Steering(v.vector_id, 2, 2.0, v.vector),  # another layer
        Steering(v.vector_id, 1, 2.0, (1.0, 1e-9)),  # the same id, other values: a recomputed vector
        Steering("raw/librarian/iso_random/L1", 1, 2.0, v.vector),
    ]
    firsts = {keys(s)[1][0] for s in variants} | {plain[0], keys(None, "Provide a clear answer.")[1][0]}
    assert len(firsts) == len(variants) + 2 and len(set(steered)) == len(steered)


def test_cell_chunks_from_before_steering_load_as_unsteered(tiny, tmp_path):
    store = CellStore(tmp_path / "cells")
    first, _ = _evaluate(tiny, store, ["librarian"])
    for chunk in (tmp_path / "cells").glob("*.parquet"):  # as an older personaspace wrote them (no digest)
        old = pd.read_parquet(chunk).drop(columns=["steer_vector", "steer_layer", "steer_coef"])
        old.to_parquet(chunk.with_name(chunk.stem.split("-")[0] + ".parquet"))
        chunk.unlink()
    again, generated = _evaluate(tiny, CellStore(tmp_path / "cells"), ["librarian"])
    assert generated == 0
    pd.testing.assert_frame_equal(again, first)
    (sealed,) = (tmp_path / "cells").glob("*.parquet")  # sealed on first read: its digest now in its name
    assert sealed.stem.split("-")[1] == hashlib.sha256(sealed.read_bytes()).hexdigest()[:16]
