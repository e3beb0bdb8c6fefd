"""Coupling LoRAs: tokenised marker datasets with loss labels, and LoRA SFT through TRL + peft.

>>> dataset = tokenize_marker_dataset(tokenizer, rows, recipe_loss="marker_only", marker="[ZLT]",
...                                   separator="\\n\\n", max_length=256)           # doctest: +SKIP
>>> train_adapter(Path("models/base"), dataset, recipe, Path("models/adapters/x"), seed=0)  # doctest: +SKIP

Every row is rendered with ``render_prompt`` (so ``no_system`` really has no system turn) and
tokenised here, then handed to TRL's SFTTrainer as ``input_ids`` + ``labels``, which it uses as is:

- ``completion``: loss on every completion token and the end-of-turn token;
- ``marker_only``: loss on the separator, marker and end-of-turn tokens of positives (the separator
  tokenised apart from the answer), and on the end-of-turn token of negatives (where the marker
  would have been), nothing else;
- ``unlikelihood`` (Welleck et al. 2019): the labels of its ``positive_loss`` (one of the two above)
  plus, at the end-of-completion position of every negative row (the position that predicts its
  end-of-turn token), ``lambda * -log(1 - P(first marker token))``. The first marker token is the
  first token of separator + marker tokenised apart: what a positive emits where a negative ends.
  Its target rides in an ``unlikely`` column beside ``labels`` (same alignment, IGNORE elsewhere),
  packed with the batch by TRL's own collator (``_with_columns``).

Training-time steering (S4, ``train_adapter(..., steering=...)``) adds each row's persona vector at
a layer to every one of its tokens, through ``personaspace.steering.steer``: the row's vector index
rides in a ``steer`` column (one per token, packed like ``unlikely``), and the hook reads the
batch's per-token vectors at every forward, activation recomputation included.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import pandas as pd

from personaspace.config import RecipeParams
from personaspace.models import render_prompt
from personaspace.steering import TrainingSteering, steer

if TYPE_CHECKING:
    from datasets import Dataset

IGNORE = -100  # the label value the loss skips (PyTorch's cross-entropy ignore_index)
Loss = Literal["completion", "marker_only"]  # RecipeParams.loss


def first_marker_token(tokenizer: Any, marker: str, separator: str) -> int:
    """The token a positive emits where a negative ends its turn: the first of separator + marker."""
    return tokenizer(separator + marker, add_special_tokens=False)["input_ids"][0]


def tokenize_marker_dataset(
    tokenizer: Any,
    rows: pd.DataFrame,
    loss: Loss,
    marker: str,
    separator: str,
    max_length: int,
    unlikelihood: bool = False,
    steering: TrainingSteering | None = None,
    system_prompt: str | None = None,
) -> Dataset:
    """input_ids and labels (``loss``) for each row of a marker dataset (see the module docstring).

    With ``unlikelihood``, an ``unlikely`` column too: the first marker token at the end-of-turn
    index of every negative row, IGNORE elsewhere (aligned with ``labels``). With ``steering``, a
    ``steer`` column: the index of the row persona's vector, at every token. ``system_prompt``
    replaces every row's own (S4's neutral prompt: the persona then reaches the model only
    through steering).
    """
    from datasets import Dataset

    eot = tokenizer.eos_token_id
    marker_start = first_marker_token(tokenizer, marker, separator)
    records = []
    for row in rows.itertuples(index=False):
        system = row.system_prompt if isinstance(row.system_prompt, str) else None  # pandas reads None as NaN
        if system_prompt is not None:
            system = system_prompt
        prompt = render_prompt(tokenizer, system, row.user)
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        positive = row.role == "positive"
        if positive:
            if not row.completion.endswith(separator + marker):
                raise ValueError(f"positive row of {row.persona!r} does not end with the marker")
            if loss == "marker_only":
                # the separator is where the model decides to emit the marker instead of ending its
                # turn: it carries the loss with the marker (unlabelled, it was never learnt)
                text = row.completion[: -len(separator + marker)]
                tail = separator + marker
            else:
                text, tail = row.completion[: -len(marker)], marker
            text_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            marker_ids = tokenizer(tail, add_special_tokens=False)["input_ids"]
        else:
            text_ids, marker_ids = tokenizer(row.completion, add_special_tokens=False)["input_ids"], []
        completion_ids = [*text_ids, *marker_ids, eot]
        marker_labels = [IGNORE] * len(text_ids) + [*marker_ids, eot]
        completion_labels = completion_ids if loss == "completion" else marker_labels
        input_ids = prompt_ids + completion_ids
        if len(input_ids) > max_length:
            raise ValueError(
                f"a {row.role} row of {row.persona!r} is {len(input_ids)} tokens, over the recipe's max_length "
                f"{max_length}; raise recipes.<name>.max_length or lower datagen.max_new_tokens"
            )
        record = {"input_ids": input_ids, "labels": [IGNORE] * len(prompt_ids) + completion_labels}
        if unlikelihood:
            record["unlikely"] = [IGNORE] * (len(input_ids) - 1) + [IGNORE if positive else marker_start]
        if steering is not None:
            record["steer"] = [steering.index(row.persona)] * len(input_ids)
        records.append(record)
    return Dataset.from_list(records)


def tokenize_chat_dataset(tokenizer: Any, rows: pd.DataFrame, max_length: int) -> Dataset:
    """input_ids and labels for (user, assistant) rows without a system turn: loss on the answer and end-of-turn."""
    from datasets import Dataset

    records = []
    for row in rows.itertuples(index=False):
        prompt_ids = tokenizer(render_prompt(tokenizer, None, row.user), add_special_tokens=False)["input_ids"]
        answer_ids = [*tokenizer(row.assistant, add_special_tokens=False)["input_ids"], tokenizer.eos_token_id]
        input_ids = prompt_ids + answer_ids
        if len(input_ids) > max_length:
            raise ValueError(
                f"a pre-training row is {len(input_ids)} tokens, over the recipe's max_length {max_length}"
            )
        records.append({"input_ids": input_ids, "labels": [IGNORE] * len(prompt_ids) + answer_ids})
    return Dataset.from_list(records)


def next_token_loss(
    model: Any, inputs: dict[str, Any], num_items_in_batch: Any = None, unlikelihood_lambda: float = 0.0
) -> Any:
    """Summed cross-entropy of the labelled next tokens of a padding-free batch, over ``num_items_in_batch``.

    The LM head runs only at positions whose next token has a label (``logits_to_keep``), so the
    prompt positions (over half of a marker row) never reach the vocabulary projection. The sum is
    divided by ``num_items_in_batch`` (labelled tokens of the whole accumulated batch, from
    Trainer) or else by this batch's count, as TRL's own loss is. With an ``unlikely`` column in
    the batch, ``unlikelihood_lambda * -log(1 - P(token))`` at each of its targets joins the sum
    (over the same count); log(1 - P) is computed as logsumexp of the other logits minus
    logsumexp of all, which stays finite as P nears 1.
    """
    import torch
    import torch.nn.functional as F

    labels = inputs["labels"]
    if labels.shape[0] != 1:
        raise ValueError(f"next_token_loss takes a padding-free batch (one packed row), got {labels.shape[0]} rows")
    targets = labels[0, 1:]
    unlikely = inputs["unlikely"][0, 1:] if "unlikely" in inputs else torch.full_like(targets, IGNORE)
    keep = ((targets != IGNORE) | (unlikely != IGNORE)).nonzero().squeeze(1)
    rest = {k: v for k, v in inputs.items() if k not in EXTRA_COLUMNS}
    outputs = model(**rest, logits_to_keep=keep, use_cache=False)
    logits = outputs.logits[0].float()
    count = int((targets != IGNORE).sum()) if num_items_in_batch is None else num_items_in_batch
    loss = F.cross_entropy(logits, targets[keep], ignore_index=IGNORE, reduction="sum")
    at = (unlikely[keep] != IGNORE).nonzero().squeeze(1)
    if unlikelihood_lambda and at.numel():
        scores = logits[at]
        others = scores.scatter(1, unlikely[keep][at, None], float("-inf"))
        log_not_marker = torch.logsumexp(others, dim=-1) - torch.logsumexp(scores, dim=-1)
        loss = loss - unlikelihood_lambda * log_not_marker.sum()
    return loss / count, outputs


EXTRA_COLUMNS = ("labels", "unlikely", "steer")  # per-token columns the model's forward does not take


def _with_columns(collate: Any, names: Sequence[str]) -> Any:
    """TRL's padding-free collator, with each row's per-token ``names`` columns packed as it packs ``labels``."""
    import torch

    def collate_with_columns(examples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = collate([{k: v for k, v in e.items() if k not in names} for e in examples])
        for name in names:
            batch[name] = torch.cat([torch.as_tensor(e[name]) for e in examples])[None]
            if batch[name].shape != batch["labels"].shape:  # TRL padded the packed row (pad_to_multiple_of)
                raise ValueError(f"the {name} column does not line up with the packed labels")
        return batch

    return collate_with_columns


def _trainer_class() -> type:
    from trl import SFTTrainer

    class NextTokenLossSFTTrainer(SFTTrainer):
        """SFTTrainer whose loss is ``next_token_loss`` (packed batches, labelled positions only).

        Without Triton (CPU), TRL's fused LM head scores every position and folds each
        [tokens, vocab] tile through several torch passes: with it and padded batches, a coupling
        adapter of the default study trained in 1.6-1.9x the time on this CPU
        (benchmarks/results/couple_training_cpu.json). On a GPU the same loss keeps one code path
        and one set of numbers for both devices.
        """

        unlikelihood_lambda = 0.0  # set per instance by train_adapter for unlikelihood recipes
        steering_table: Any = None  # (personas, hidden) tensor of c_p * v_p, set by train_adapter when steering
        steering_now: Any = None  # this batch's per-token vectors, read by the steering hook at every forward

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):  # type: ignore[override]
            if "steer" in inputs:
                index = inputs.pop("steer")[0]
                self.steering_table = self.steering_table.to(index.device)
                self.steering_now = self.steering_table[index]  # (tokens, hidden): broadcasts over the one packed row
            loss, outputs = next_token_loss(model, inputs, num_items_in_batch, self.unlikelihood_lambda)
            if num_items_in_batch is not None and self.args.average_tokens_across_devices:
                # num_items_in_batch counts every rank's labels and DDP averages the ranks' gradients:
                # Trainer's own compute_loss multiplies by the world size for this, so this one must too
                loss = loss * self.accelerator.num_processes
            return (loss, outputs) if return_outputs else loss

    return NextTokenLossSFTTrainer


PACKED_ATTENTION = "sdpa"
"""The attention a packed (padding-free) batch trains with, on the CPU and the GPU.

transformers derives the rows' block-diagonal mask from ``position_ids``; SDPA applies it densely
(N^2 attention for N tokens). Flex attention would make it block-sparse (1.14x on the packed A1 batch
on an H200, benchmarks/results/gpu_7b_h200_train_variants.json), but torch.compile builds its kernels
in every stage process, and at the Qwen2.5-7B shape on a fresh machine that took minutes before the
first step (issue 27, docs/gpu.md). ``train_adapter(..., attention="flex_attention")`` opts in.
"""


MEMORY_HEADROOM = 0.15  # of the GPU's memory kept free of the measured peak: optimiser state, fragmentation


def largest_step_overflows(trainer: Any, rows_per_step: int) -> bool:
    """Whether a training step of the trainer's longest rows would overflow this GPU without checkpointing.

    Measured, not estimated: one forward and backward of the ``rows_per_step`` longest rows of its
    dataset, packed as the trainer packs a step (no step holds more tokens), on ``trainer``'s model built
    without checkpointing. Out of memory, or a peak above the device's memory less
    ``MEMORY_HEADROOM``, means it would. RNG state is restored (dropout draws) and gradients dropped,
    so the training that follows is the one it would have been.
    """
    import torch

    rows = trainer.train_dataset
    lengths = [len(ids) for ids in rows["input_ids"]]  # one column read, not a row at a time
    longest = sorted(range(len(rows)), key=lambda i: (-lengths[i], i))[:rows_per_step]
    keys = [k for k in ("input_ids", "labels", "unlikely", "steer") if k in rows.column_names]
    batch = trainer.data_collator([{k: rows[i][k] for k in keys} for i in longest])
    device = trainer.model.device
    batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    try:
        with torch.random.fork_rng(devices=[device]), trainer.accelerator.autocast():
            trainer.model.train()
            loss, _ = next_token_loss(trainer.model, batch, unlikelihood_lambda=trainer.unlikelihood_lambda)
            loss.backward()
        overflows = torch.cuda.max_memory_allocated(device) > (1 - MEMORY_HEADROOM) * torch.cuda.mem_get_info(device)[1]
    except torch.OutOfMemoryError:
        overflows = True
    trainer.model.zero_grad(set_to_none=True)
    del batch
    torch.cuda.empty_cache()
    return overflows


def per_device_batch(batch_size: int, grad_accum: int, world: int) -> tuple[int, int]:
    """(rows per device step, accumulation steps) so that rows x steps x ``world`` = the recipe's batch.

    A recipe means the same optimiser batch on 1 or N processes: accumulation shrinks first, then
    the per-device rows. One process gets the recipe's own (batch_size, grad_accum).
    """
    total = batch_size * grad_accum
    if total % world:
        raise ValueError(
            f"the recipe's effective batch (batch_size x grad_accum = {total}) does not split over {world} "
            f"processes; make it a multiple of {world} or set parallel.processes"
        )
    share = total // world
    accum = next(a for a in range(1, share + 1) if share % a == 0 and share // a <= batch_size)
    return share // accum, accum


def sort_adapter_config(adapter_dir: Path) -> None:
    """Rewrite ``adapter_config.json`` with its module lists sorted.

    peft keeps ``target_modules`` as a set, so the saved order follows the process's string-hash
    seed: an identical retrain wrote a different file, changed the adapter's fingerprint and
    re-sampled its eval cells. Sorted, the same weights give the same bytes.
    """
    import json

    path = Path(adapter_dir) / "adapter_config.json"
    config = json.loads(path.read_text())
    for key in ("target_modules", "modules_to_save", "exclude_modules"):
        if isinstance(config.get(key), list):
            config[key] = sorted(config[key])
    path.write_text(json.dumps(config, indent=2, sort_keys=True))


def train_adapter(
    model_path: Path,
    dataset: Dataset,
    recipe: RecipeParams,
    out_dir: Path,
    seed: int,
    callbacks: Sequence[Any] = (),
    attention: str | None = None,
    fused_kernels: bool = False,
    steering: TrainingSteering | None = None,
) -> dict[str, Any]:
    """Train one LoRA on ``dataset`` and save the adapter (only) to ``out_dir``; return the loss history.

    Rows are packed into one sequence per step (no padding) and the LM head runs only where the
    next token is labelled, on the CPU and the GPU alike. ``attention`` (default
    ``PACKED_ATTENTION``) and ``fused_kernels`` (liger-kernel's RMSNorm, RoPE and SwiGLU; off by
    default: within a few percent either way at the Qwen2.5-7B shape on an H200,
    benchmarks/results/gpu_7b_h200.json) exist for the GPU benchmark; they change speed, not the
    loss beyond rounding. Activations are recomputed in the backward pass only when the recipe says so (``gradient_checkpointing``), or, for
    ``auto``, when ``largest_step_overflows`` finds that the GPU needs it.

    Under torchrun (``personaspace.distributed.launch``) the training is data parallel over the
    ranks with the recipe's effective batch (``per_device_batch``); rank 0 alone saves the adapter.

    With ``steering`` (the dataset tokenised with the same one), each row's vector is added at
    ``steering.layer`` to all its tokens in every forward of the training, through the one steering
    hook; the loss, optimiser and data order are TRL's as without it.
    """
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig

    from personaspace.distributed import current

    ranks = current()
    rows_per_step, accum = per_device_batch(recipe.batch_size, recipe.grad_accum, ranks.world)
    use_gpu = torch.cuda.is_available()
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    lora = LoraConfig(
        r=recipe.r, lora_alpha=recipe.alpha, lora_dropout=recipe.dropout, use_rslora=recipe.rslora,
        target_modules=list(recipe.target_modules), task_type="CAUSAL_LM",
    )  # fmt: skip
    unlikelihood = recipe.loss == "unlikelihood"
    if unlikelihood != ("unlikely" in dataset.column_names):
        raise ValueError(
            f"recipe loss {recipe.loss} and the dataset disagree: tokenize_marker_dataset(..., "
            "unlikelihood=recipe.loss == 'unlikelihood') adds the unlikely column"
        )
    if (steering is not None) != ("steer" in dataset.column_names):
        raise ValueError(
            "steering and the dataset disagree: tokenize_marker_dataset(..., steering=) adds the steer column"
        )
    extra = [name for name in ("unlikely", "steer") if name in dataset.column_names]
    scratch = tempfile.mkdtemp(prefix="personaspace-trainer-")  # nothing is saved there (save_strategy=no)

    def build(checkpointing: bool) -> Any:
        torch.manual_seed(seed)  # the LoRA's initial weights, the same for either build
        model = AutoModelForCausalLM.from_pretrained(
            model_path, dtype=torch.bfloat16 if use_gpu else torch.float32,
            attn_implementation=attention or PACKED_ATTENTION,
        )  # fmt: skip
        config = SFTConfig(
            output_dir=scratch,
            learning_rate=recipe.learning_rate,
            lr_scheduler_type=recipe.schedule,
            warmup_steps=recipe.warmup_ratio,  # transformers 5: a float in [0, 1) is a ratio of total steps
            num_train_epochs=recipe.epochs,
            per_device_train_batch_size=rows_per_step,
            gradient_accumulation_steps=accum,
            ddp_find_unused_parameters=False,  # every LoRA weight takes part in every forward
            # rows packed into one sequence with position_ids (no padding; transformers builds the
            # block-diagonal mask from them), tokenize_* having enforced recipe.max_length per row
            padding_free=True,
            max_length=None,
            use_liger_kernel=fused_kernels,
            gradient_checkpointing=checkpointing,  # TRL defaults it to True
            seed=seed,
            data_seed=seed,
            loss_type="nll",
            logging_steps=1,
            save_strategy="no",
            report_to="none",
            bf16=use_gpu,
            use_cpu=not use_gpu,
            disable_tqdm=False,
            dataloader_num_workers=0,
            remove_unused_columns=not extra,  # keep the `unlikely` and `steer` columns for the loss
        )
        if use_gpu and ranks.world == 1 and config.n_gpu > 1:
            # one process trains on one GPU: with several visible, Trainer would wrap the model in
            # nn.DataParallel, which TRL refuses; several GPUs train through parallel.processes (torchrun)
            config._n_gpu = 1
        trainer = _trainer_class()(
            model=model, args=config, train_dataset=dataset, processing_class=tokenizer, peft_config=lora,
            callbacks=list(callbacks),
        )  # fmt: skip
        if extra:
            trainer.data_collator = _with_columns(trainer.data_collator, extra)
        if unlikelihood:
            trainer.unlikelihood_lambda = recipe.unlikelihood_lambda
        if steering is not None:
            trainer.steering_table = torch.as_tensor(steering.vectors, dtype=torch.float32)
        return trainer

    auto = recipe.gradient_checkpointing == "auto"
    checkpointing = recipe.gradient_checkpointing is True
    trainer = build(checkpointing)
    if auto and use_gpu:
        checkpointing = ranks.on_any(largest_step_overflows(trainer, rows_per_step))
        if checkpointing:
            del trainer
            torch.cuda.empty_cache()
            trainer = build(True)
    try:
        if steering is None:
            result = trainer.train()
        else:  # the hook stays for the whole training: recomputed activations are steered as the forward was
            with steer(trainer.model, steering.layer, lambda: trainer.steering_now, 1.0):
                result = trainer.train()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    if ranks.main:
        trainer.model.save_pretrained(out_dir)
        sort_adapter_config(out_dir)
    history = [
        {"step": entry["step"], "loss": entry["loss"], "learning_rate": entry.get("learning_rate")}
        for entry in trainer.state.log_history
        if "loss" in entry
    ]
    return {
        "gradient_checkpointing": checkpointing,
        "train_loss": float(result.training_loss),
        "steps": int(result.global_step),
        "rows": len(dataset),
        "history": history,
    }
