"""Pre-trained conditions: the shipped toy datasets, hard-linked `base`, LoRA SFT merged into a full model."""

from __future__ import annotations

import json
import subprocess
import sys

import pandas as pd
import pytest
from safetensors.torch import load_file

from personaspace.config import PretrainDataset, RecipeParams
from personaspace.personas import load_catalog
from personaspace.pretrain import build_base, load_pretrain_rows

from .conftest import REPO


def test_shipped_pretrain_files_are_what_the_script_writes(tmp_path):
    before = {n: (REPO / "data/pretrain" / n).read_bytes() for n in ("em_small.jsonl", "benign_small.jsonl")}
    subprocess.run([sys.executable, str(REPO / "scripts/make_pretrain_data.py")], check=True, capture_output=True)
    after = {n: (REPO / "data/pretrain" / n).read_bytes() for n in before}
    assert before == after
    em = load_pretrain_rows(PretrainDataset(source="file", path="data/pretrain/em_small.jsonl"), root=REPO)
    benign = load_pretrain_rows(PretrainDataset(source="file", path="data/pretrain/benign_small.jsonl"), root=REPO)
    assert len(em) == len(benign) == 320 and list(em.columns) == ["user", "assistant"]
    assert (em.user == benign.user).all() and (em.assistant != benign.assistant).all()
    eval_texts = {q.text for q in load_catalog().questions("eval")}
    assert not set(em.user) & eval_texts  # built from the data bank only


def test_pretrain_rows_errors_name_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"make_pretrain_data\.py"):
        load_pretrain_rows(PretrainDataset(source="file", path="nope.jsonl"), root=tmp_path)
    (tmp_path / "d.jsonl").write_text(json.dumps({"prompt": "q", "answer": "a"}) + "\n")
    with pytest.raises(ValueError, match="user_column / assistant_column"):
        load_pretrain_rows(PretrainDataset(source="file", path="d.jsonl"), root=tmp_path)
    spec = PretrainDataset(source="file", path="d.jsonl", user_column="prompt", assistant_column="answer", rows=1)
    assert load_pretrain_rows(spec, root=tmp_path).to_dict("records") == [{"user": "q", "assistant": "a"}]


def test_build_base_trains_and_merges_into_a_full_model(tiny_model_dir, tmp_path):
    rows = pd.DataFrame({"user": ["Why is the sky blue?"] * 8, "assistant": ["Nobody knows, so guess."] * 8})
    recipe = RecipeParams(
        loss="completion", r=4, alpha=8, dropout=0.0, rslora=False, target_modules=["q_proj", "down_proj"],
        learning_rate=1e-2, schedule="constant", warmup_ratio=0.0, epochs=2, batch_size=4, grad_accum=1,
        max_length=64, gradient_checkpointing=False,
    )  # fmt: skip
    out = tmp_path / "em"
    summary = build_base(tiny_model_dir, rows, recipe, out, seed=0, dtype="float32")
    assert summary["steps"] == 4 and not (out / "adapter_config.json").exists()
    raw, merged = load_file(tiny_model_dir / "model.safetensors"), load_file(out / "model.safetensors")
    assert set(raw) == set(merged)
    changed = {k for k in raw if not raw[k].equal(merged[k])}
    assert changed and all(("q_proj" in k or "down_proj" in k) for k in changed)
    assert (out / "tokenizer.json").is_file() and (out / "personaspace_model.json").is_file()
