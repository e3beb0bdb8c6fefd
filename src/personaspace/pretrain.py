"""Pretrained bases (METHODS.md C2/C3): LoRA SFT of the raw model on a chat dataset, merged once.

>>> rows = load_pretrain_rows(params.pretrain["em"].dataset)                         # doctest: +SKIP
>>> build_base(Path("models/raw"), rows, recipe, Path("models/em"), seed=0, dtype="bfloat16")  # doctest: +SKIP
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

import pandas as pd

from personaspace.config import PretrainDataset, RecipeParams
from personaspace.train import tokenize_chat_dataset, train_adapter

MODEL_FILES_KEPT = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "personaspace_model.json")


def load_pretrain_rows(dataset: PretrainDataset, root: Path = Path(".")) -> pd.DataFrame:
    """The (user, assistant) rows of a pre-training dataset: a shipped JSONL or a hub dataset."""
    if dataset.source == "file":
        path = root / str(dataset.path)
        if not path.is_file():
            raise FileNotFoundError(f"pretrain dataset {path} not found; run `python scripts/make_pretrain_data.py`")
        table = pd.read_json(path, lines=True)
    else:
        from datasets import load_dataset

        table = load_dataset(dataset.repo_id, split=dataset.split).to_pandas()
    missing = [c for c in (dataset.user_column, dataset.assistant_column) if c not in table.columns]
    if missing:
        raise ValueError(f"pretrain dataset has no column(s) {missing}; set user_column / assistant_column")
    table = table.rename(columns={dataset.user_column: "user", dataset.assistant_column: "assistant"})
    if dataset.rows is not None:
        table = table.head(dataset.rows)
    return table[["user", "assistant"]].reset_index(drop=True)


def build_base(
    raw_path: Path, rows: pd.DataFrame, recipe: RecipeParams, out_dir: Path, seed: int, dtype: str
) -> dict[str, Any]:
    """LoRA SFT of the raw model on ``rows``, merged (in float32) into a full model saved as ``dtype``.

    Under torchrun the training is data parallel (``train_adapter``) and rank 0 alone merges and saves.
    """
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from personaspace.distributed import current
    from personaspace.models import load_tokenizer

    tokenizer = load_tokenizer(raw_path)
    dataset = tokenize_chat_dataset(tokenizer, rows, recipe.max_length)
    with tempfile.TemporaryDirectory(prefix="personaspace-pretrain-") as scratch:
        adapter_dir = Path(scratch) / "adapter"
        summary = train_adapter(raw_path, dataset, recipe, adapter_dir, seed=seed)
        if not current().main:
            return summary
        raw = AutoModelForCausalLM.from_pretrained(raw_path, dtype=torch.float32)
        merged = PeftModel.from_pretrained(raw, str(adapter_dir)).merge_and_unload()
        merged.to(getattr(torch, dtype)).save_pretrained(out_dir)
    for name in MODEL_FILES_KEPT:
        if (raw_path / name).is_file():
            shutil.copy2(raw_path / name, out_dir / name)
    return summary
