"""The GPU speed benchmark at the Qwen2.5-7B shape: personaspace's paths against the plain libraries'.

    python benchmarks/gpu_7b.py generate --tokenizer .gpu/qwen-tokenizer --out $OUT/gpu_7b.json
    python benchmarks/gpu_7b.py generate-steered ...   |   probes ...   |   train ...   |   all ...

The model is built in this process (``qwen_shape.build_model``: random-init bf16 weights of
Qwen2.5-7B-Instruct's shape, lm_head rows of special tokens zeroed so no row ends early, the others
scaled so a top-p 0.95 nucleus is a few tokens); the tokenizer is the offline Qwen2.5 one
(``qwen_shape.py --tokenizer-only``). Prompts are the project's: eval questions under panel-12
personas, rendered by the project's chat rendering. Each subcommand times both paths in one
process, interleaved (A, B, A, B, ...); the first pass of each path is reported apart from the warm
ones, and ratios compare warm medians.

- ``generate``: the hf backend's generator on a GPU (``generate.hf_generator``: the static decode loop,
  ``decode.StaticDecodeGenerator``, with a static KV cache, CUDA graphs and host checks every
  ``--check-every`` steps) and the plain loop (``HFGenerator``, the CPU's) against warm plain
  ``model.generate`` on the same padded prompts, and against plain ``generate``'s best case (every prompt cut to the shortest
  prompt's length: no padding, no attention mask to honour). Tokens per second count generated tokens.
- ``generate-steered``: the same two first paths under ``personaspace.steering.steer`` at a layer.
- ``probes``: ``probes.last_input_states`` (every layer's last-token state) against a plain forward
  with ``output_hidden_states=True`` over the same batches.
- ``train``: ``train.train_adapter`` (TRL + peft, the recipe's settings: packed rows, flex
  attention, the LM head at labelled positions) on synthetic marker rows of varied
  lengths, one epoch, against TRL's defaults (padded batches, checkpointing) on the same rows, and
  variants of ours (checkpointing flipped or off at half the rows per step
  and twice the accumulation, SDPA, liger-kernel); useful (non-padding) tokens per second and
  MFU = (6N + 4 x layers x seq x hidden) x useful tokens/s
  over the bf16 peak (``--peak-tflops``, else measured with matmuls; N: the model's parameters;
  no recompute counted).

Results (device, versions, every pass) are merged into ``--out`` under the subcommand's name.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
from qwen_shape import build_model

from personaspace.completions import system_message
from personaspace.decode import StaticDecodeGenerator
from personaspace.generate import ChatRequest, HFGenerator, Sampling, hf_generator
from personaspace.models import load_tokenizer, render_prompt
from personaspace.personas import load_catalog


def synced() -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter()


def matmul_peak_tflops(size: int = 8192, repeats: int = 50) -> float:
    """bf16 TFLOP/s of back-to-back square matmuls: the MFU denominator measured on this GPU."""
    a = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    for _ in range(5):
        a @ b
    start = synced()
    for _ in range(repeats):
        a @ b
    return 2 * size**3 * repeats / (synced() - start) / 1e12


def eval_requests(tokenizer: Any, n: int, suffix: str = "") -> list[ChatRequest]:
    """``n`` requests of the project's eval workload: panel-12 personas x eval questions, seeded by index."""
    catalog = load_catalog()
    personas = [catalog.persona(p) for p in catalog.panel(12)]
    questions = [q.text for q in catalog.questions("eval")]
    pairs = [(p, q) for p in personas for q in questions]
    return [
        ChatRequest(system_message(pairs[i % len(pairs)][0], tokenizer), pairs[i % len(pairs)][1] + suffix, seed=i)
        for i in range(n)
    ]


def interleave(paths: dict[str, Callable[[], float]], repeats: int, deadline: float) -> dict[str, dict]:
    """Run each path ``repeats`` times in turn (A, B, A, B); each returns its work units; per path:
    the first pass apart, the warm passes' rates and their median."""
    rates: dict[str, list[float]] = {name: [] for name in paths}
    seconds: dict[str, list[float]] = {name: [] for name in paths}
    for rep in range(repeats):
        for name, run in paths.items():
            if rep > 1 and time.monotonic() > deadline:
                break
            start = synced()
            units = run()
            took = synced() - start
            rates[name].append(units / took)
            seconds[name].append(round(took, 2))
            print(f"  {name} pass {rep}: {units / took:,.1f}/s ({took:.1f} s)", flush=True)
    return {
        name: {
            "first_pass_per_s": round(rates[name][0], 1),
            "warm_per_s": [round(r, 1) for r in rates[name][1:]],
            "warm_median_per_s": round(statistics.median(rates[name][1:]), 1) if len(rates[name]) > 1 else None,
            "seconds": seconds[name],
        }
        for name in paths
    }


def plain_generate(model: Any, tokenizer: Any, prompts: list[list[int]], sampling: Sampling, batch: int) -> int:
    """transformers' ``generate`` over left-padded batches; returns the generated token slots (all rows run on)."""
    total = 0
    for start in range(0, len(prompts), batch):
        rows = prompts[start : start + batch]
        enc = tokenizer.pad({"input_ids": rows}, return_tensors="pt").to(model.device)
        with torch.inference_mode():
            out = model.generate(
                **enc, do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p,
                max_new_tokens=sampling.max_new_tokens, min_new_tokens=sampling.max_new_tokens,
                pad_token_id=tokenizer.pad_token_id,
            )  # fmt: skip
        total += out.shape[0] * (out.shape[1] - enc["input_ids"].shape[1])
    return total


def bench_generate(model: Any, tokenizer: Any, args: argparse.Namespace, steered: bool) -> dict:
    from personaspace.steering import steer

    generator = HFGenerator(model, tokenizer, batch_size=args.batch_size, progress=False)
    static = hf_generator(model, tokenizer, batch_size=args.batch_size, progress=False)  # what the stages get
    if not isinstance(static, StaticDecodeGenerator):
        raise SystemExit("hf_generator did not pick the static decode loop: generate needs a CUDA device")
    static.check_every = args.check_every
    requests = eval_requests(tokenizer, args.requests)
    sampling = Sampling(temperature=1.0, top_p=0.95, max_new_tokens=args.max_new_tokens)
    ids = [
        tokenizer(render_prompt(tokenizer, r.system, r.user), add_special_tokens=False)["input_ids"] for r in requests
    ]
    shortest = min(map(len, ids))
    equal = [row[:shortest] for row in ids]

    texts: dict[str, list[str]] = {}

    def ours(name: str, gen: HFGenerator) -> Callable[[], float]:
        def run() -> float:
            out = gen.generate(requests, sampling)
            texts[name] = [c.text for c in out]
            return sum(c.n_tokens for c in out)

        return run

    paths: dict[str, Callable[[], float]] = {
        "personaspace_static": ours("personaspace_static", static),
        "personaspace_hf": ours("personaspace_hf", generator),
        "plain_generate": lambda: plain_generate(model, tokenizer, ids, sampling, args.batch_size),
    }
    if not steered:
        paths["plain_generate_equal_length"] = lambda: plain_generate(
            model, tokenizer, equal, sampling, args.batch_size
        )
    if args.profile:
        return profile_paths(paths, args.repeats)
    vector = torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    vector = vector / vector.norm() * 4.0
    with steer(model, args.layer, vector, 1.0) if steered else nullcontext():
        results = interleave(paths, args.repeats, args.deadline)
    ratios = {
        f"{mine}/{name}": round(results[mine]["warm_median_per_s"] / r["warm_median_per_s"], 2)
        for mine in ("personaspace_static", "personaspace_hf")
        for name, r in results.items()
        if name != mine and not name.startswith(mine) and results[mine]["warm_median_per_s"] and r["warm_median_per_s"]
    }
    same = sum(a == b for a, b in zip(texts["personaspace_static"], texts["personaspace_hf"], strict=True))
    return {
        "unit": "generated tokens",
        "requests": len(requests),
        "batch_size": args.batch_size,
        "max_new_tokens": args.max_new_tokens,
        "prompt_tokens": {"min": shortest, "max": max(map(len, ids)), "mean": round(sum(map(len, ids)) / len(ids), 1)},
        "steering": {"layer": args.layer, "vector_norm": 4.0} if steered else None,
        "paths": results,
        "ratios_warm": ratios,
        "static_equals_hf_completions": f"{same}/{len(requests)}",
        "check_every": args.check_every,
    }


def profile_paths(paths: dict[str, Callable[[], float]], repeats: int) -> dict:
    """Warm each path, then one pass under torch.profiler: GPU busy time against wall time, top ops."""
    from torch.profiler import ProfilerActivity, profile

    report = {}
    for name, run in paths.items():
        run()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            start = synced()
            run()
            wall = synced() - start
        events = prof.key_averages()
        gpu = sum(e.self_device_time_total for e in events) / 1e6
        top = sorted(events, key=lambda e: e.self_device_time_total, reverse=True)[:12]
        report[name] = {"wall_s": round(wall, 2), "gpu_busy_s": round(gpu, 2),
                        "top_gpu_ops": {e.key[:80]: round(e.self_device_time_total / 1e6, 3) for e in top}}  # fmt: skip
        print(name, json.dumps(report[name], indent=1), flush=True)
    return {"profile": report}


def bench_probes(model: Any, tokenizer: Any, args: argparse.Namespace) -> dict:
    from personaspace.probes import last_input_states

    requests = eval_requests(tokenizer, args.probe_prompts)
    prompts = [render_prompt(tokenizer, r.system, r.user) for r in requests]
    batch = args.probe_batch

    def ours() -> float:
        last_input_states(model, tokenizer, prompts, batch)
        return len(prompts)

    def plain() -> float:
        for start in range(0, len(prompts), batch):
            enc = tokenizer(prompts[start : start + batch], return_tensors="pt", padding=True, add_special_tokens=False)
            with torch.inference_mode():
                out = model(**enc.to(model.device), output_hidden_states=True, logits_to_keep=1)
            torch.stack([h[:, -1, :] for h in out.hidden_states], dim=1).float().cpu()
        return len(prompts)

    results = interleave({"personaspace_probes": ours, "plain_forward": plain}, args.repeats, args.deadline)
    a, b = results["personaspace_probes"]["warm_median_per_s"], results["plain_forward"]["warm_median_per_s"]
    return {"unit": "prompts", "prompts": len(prompts), "batch_size": batch, "paths": results,
            "ratios_warm": {"personaspace_probes/plain_forward": round(a / b, 2) if a and b else None}}  # fmt: skip


def bench_train(model: Any, tokenizer: Any, args: argparse.Namespace) -> dict:
    """train_adapter (the stage's path) against TRL's defaults on the same rows, recipe and seed.

    TRL's defaults: SFTTrainer with padded batches of the recipe's size, gradient checkpointing
    (its default), SDPA, its own loss. Ours is measured as the stage runs it, and with the
    recipe's checkpointing flipped, flex attention swapped for SDPA and liger-kernel on, so each
    part's share is visible. Each path's loss history is kept: they train the same rows in the
    same order, so the losses must agree to bf16 rounding. Rates are given for the whole pass (model
    load and trainer setup included, as a stage pays them) and for the training phase alone.
    """
    from multi_gpu import synthetic_rows
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from personaspace.config import load_params
    from personaspace.train import tokenize_marker_dataset, train_adapter

    params = load_params(args.params)
    recipe = params.recipes[args.recipe].model_copy(update={"epochs": 1.0})
    catalog = load_catalog()
    rows = synthetic_rows(tokenizer, list(catalog.panel(12)), [q.text for q in catalog.questions("eval")],
                          args.train_rows, args.train_words, params.marker, params.marker_separator,
                          min_words=args.train_min_words)  # fmt: skip
    dataset = tokenize_marker_dataset(tokenizer, rows, recipe.label_loss, params.marker, params.marker_separator,
                                      recipe.max_length)  # fmt: skip
    lengths = [len(ids) for ids in dataset["input_ids"]]
    useful = sum(lengths)
    n_params = sum(p.numel() for p in model.parameters())
    cfg = model.config
    mean_len = useful / len(dataset)
    flops_per_token = 6 * n_params + 4 * cfg.num_hidden_layers * mean_len * cfg.hidden_size
    scratch = Path(tempfile.mkdtemp())
    model_dir = scratch / "model"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    losses: dict[str, list[float]] = {}
    memory: dict[str, float] = {}
    checkpointed: dict[str, bool] = {"trl_defaults": True}
    phase: dict[str, list[float]] = {}  # seconds of each pass spent in Trainer.train (no load, no setup)

    class Clock(TrainerCallback):
        def __init__(self, name: str) -> None:
            self.name = name

        def on_train_begin(self, *args: Any, **kwargs: Any) -> None:
            self.start = synced()

        def on_train_end(self, *args: Any, **kwargs: Any) -> None:
            phase.setdefault(self.name, []).append(round(synced() - self.start, 2))

    def ours(name: str, attention: str | None = None, fused_kernels: bool = False,
             **change: Any) -> Callable[[], float]:  # fmt: skip
        def run() -> float:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            result = train_adapter(model_dir, dataset, recipe.model_copy(update=change), scratch / name, seed=0,
                                   callbacks=[Clock(name)], attention=attention, fused_kernels=fused_kernels)  # fmt: skip
            losses[name] = [round(h["loss"], 4) for h in result["history"]]
            checkpointed[name] = result["gradient_checkpointing"]
            memory[name] = round(torch.cuda.max_memory_allocated() / 2**30, 1)
            return useful

        return run

    def trl_defaults() -> float:
        from peft import LoraConfig
        from transformers import AutoModelForCausalLM

        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
        config = SFTConfig(
            output_dir=str(scratch / "trl"), learning_rate=recipe.learning_rate, lr_scheduler_type=recipe.schedule,
            warmup_steps=recipe.warmup_ratio, num_train_epochs=1, per_device_train_batch_size=recipe.batch_size,
            gradient_accumulation_steps=recipe.grad_accum, max_length=recipe.max_length, seed=0, data_seed=0,
            logging_steps=1, save_strategy="no", report_to="none", bf16=True, disable_tqdm=True,
        )  # fmt: skip
        lora = LoraConfig(r=recipe.r, lora_alpha=recipe.alpha, lora_dropout=recipe.dropout, use_rslora=recipe.rslora,
                          target_modules=list(recipe.target_modules), task_type="CAUSAL_LM")  # fmt: skip
        trainer = SFTTrainer(model=base, args=config, train_dataset=dataset, processing_class=tokenizer,
                             peft_config=lora, callbacks=[Clock("trl_defaults")])  # fmt: skip
        trainer.train()
        losses["trl_defaults"] = [round(e["loss"], 4) for e in trainer.state.log_history if "loss" in e]
        memory["trl_defaults"] = round(torch.cuda.max_memory_allocated() / 2**30, 1)
        del trainer, base
        return useful

    paths = {
        "personaspace_train_adapter": ours("personaspace_train_adapter"),
        "trl_defaults": trl_defaults,
    }
    half = {"batch_size": max(1, recipe.batch_size // 2), "grad_accum": recipe.grad_accum * 2}
    variants = {
        "flip_checkpointing": lambda n: ours(n, gradient_checkpointing=not recipe.gradient_checkpointing),
        "auto_checkpointing": lambda n: ours(n, gradient_checkpointing="auto"),
        # four times the rows per step: the largest step overflows the GPU without checkpointing
        "auto_checkpointing_4x_rows": lambda n: ours(
            n,
            gradient_checkpointing="auto",
            batch_size=recipe.batch_size * 4,
            grad_accum=max(1, recipe.grad_accum // 4),
        ),
        "no_checkpointing_half_rows": lambda n: ours(n, gradient_checkpointing=False, **half),
        "sdpa": lambda n: ours(n, attention="sdpa"),
        "liger": lambda n: ours(n, fused_kernels=True),
        "liger_no_checkpointing": lambda n: ours(n, fused_kernels=True, gradient_checkpointing=False),
    }
    for variant in args.train_variants:
        paths[variant] = variants[variant](variant)
    results = interleave(paths, args.repeats, args.deadline)
    peak = args.peak_tflops * 1e12
    for name, r in results.items():
        r["losses"], r["peak_memory_gib"] = losses.get(name), memory.get(name)
        r["gradient_checkpointing"] = checkpointed.get(name)
        r["train_phase_seconds"] = phase.get(name)
        warm_phase = phase.get(name, [])[1:]
        r["train_phase_warm_median_per_s"] = round(useful / statistics.median(warm_phase), 1) if warm_phase else None
        for key, rate in (
            ("mfu_warm", r["warm_median_per_s"]),
            ("mfu_train_phase", r["train_phase_warm_median_per_s"]),
        ):
            r[key] = round(rate * flops_per_token / peak, 3) if rate else None
    ours_rate, trl_rate = (results[k]["warm_median_per_s"] for k in ("personaspace_train_adapter", "trl_defaults"))
    ratios = {"personaspace/trl_defaults": round(ours_rate / trl_rate, 2) if ours_rate and trl_rate else None}
    for name, r in results.items():
        base_rate = results["trl_defaults"]["train_phase_warm_median_per_s"]
        if name != "trl_defaults" and r["train_phase_warm_median_per_s"] and base_rate:
            ratios[f"{name}/trl_defaults, train phase"] = round(r["train_phase_warm_median_per_s"] / base_rate, 2)
    padded = sum(max(lengths[i : i + recipe.batch_size]) * len(lengths[i : i + recipe.batch_size])
                 for i in range(0, len(lengths), recipe.batch_size))  # fmt: skip
    return {
        "unit": "useful (non-padding) tokens",
        "recipe": args.recipe, "rows": len(dataset), "useful_tokens": useful, "mean_length": round(mean_len, 1),
        "min_length": min(lengths), "max_length_seen": max(lengths),
        "padding_share_in_order": round(1 - useful / padded, 3),
        "batch_size": recipe.batch_size, "grad_accum": recipe.grad_accum, "max_length": recipe.max_length,
        "gradient_checkpointing": recipe.gradient_checkpointing,
        "flops_per_useful_token": flops_per_token, "peak_tflops": args.peak_tflops, "paths": results,
        "ratios_warm": ratios,
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["generate", "generate-steered", "probes", "train", "all"])
    parser.add_argument("--tokenizer", type=Path, default=Path(".gpu/qwen-tokenizer"))
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument(
        "--layers", type=int, default=28, help="decoder blocks (28: Qwen2.5-7B; fewer for a smoke test)"
    )
    parser.add_argument("--requests", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--check-every", type=int, default=8, help="static decode loop: steps between host checks")
    parser.add_argument("--layer", type=int, default=20, help="steering layer")
    parser.add_argument("--probe-prompts", type=int, default=320)
    parser.add_argument("--probe-batch", type=int, default=128)
    parser.add_argument("--recipe", default="a1")
    parser.add_argument("--train-rows", type=int, default=256)
    parser.add_argument("--train-words", type=int, default=400, help="train: most words per synthetic answer")
    parser.add_argument("--train-min-words", type=int, default=100, help="train: fewest words per answer")
    parser.add_argument(
        "--train-variants",
        nargs="*",
        default=["flip_checkpointing", "sdpa", "liger"],
        choices=[
            "flip_checkpointing",
            "auto_checkpointing",
            "auto_checkpointing_4x_rows",
            "no_checkpointing_half_rows",
            "sdpa",
            "liger",
            "liger_no_checkpointing",
        ],
        help="train: extra variants of ours",
    )
    parser.add_argument("--peak-tflops", type=float, help="bf16 peak for MFU (default: measured here with matmuls)")
    parser.add_argument("--repeats", type=int, default=3, help="passes per path (the first is the warm-up)")
    parser.add_argument("--deadline", type=float, default=540, help="seconds after which no new pass starts")
    parser.add_argument("--profile", action="store_true", help="generate: one profiled pass per path, top kernels")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    args.deadline = time.monotonic() + args.deadline
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer = load_tokenizer(args.tokenizer)
    start = synced()
    model = build_model(tokenizer, args.layers, device)
    built = synced() - start
    if args.peak_tflops is None and device == "cuda":
        args.peak_tflops = round(matmul_peak_tflops(), 1)
    todo = ["generate", "generate-steered", "probes", "train"] if args.what == "all" else [args.what]
    results = json.loads(args.out.read_text()) if args.out.exists() else {}
    import peft
    import transformers

    results["setup"] = {
        "device": torch.cuda.get_device_name() if device == "cuda" else platform.processor(),
        "torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
        "model": f"Qwen2.5-7B shape, {args.layers} layers, random bf16, {sum(p.numel() for p in model.parameters()) / 1e9:.2f}B",
        "build_seconds": round(built, 1), "bf16_peak_tflops": args.peak_tflops,
    }  # fmt: skip
    for what in todo:
        print(what, flush=True)
        if what.startswith("generate"):
            results[what] = bench_generate(model, tokenizer, args, steered=what == "generate-steered")
        elif what == "probes":
            results[what] = bench_probes(model, tokenizer, args)
        else:
            results[what] = bench_train(model, tokenizer, args)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")
        print(json.dumps(results[what].get("ratios_warm", results[what].get("paths")), indent=1), flush=True)


if __name__ == "__main__":
    main()
