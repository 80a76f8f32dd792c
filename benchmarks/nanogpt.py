"""truthgpt beside nanoGPT: ms per training iteration of the same model on the same batches.

    python benchmarks/nanogpt.py --nanogpt PATH [--kinds dot,l1] [--steps 20] [--rounds 5]
                                 [--warmup 5] [--threads 2] [--bias own|false|true]
    python benchmarks/nanogpt.py --nanogpt PATH --profile   # top ops of one step, no timing

PATH is a checkout of karpathy/nanoGPT. Nothing of nanoGPT is copied here: its `model.py` is
imported from PATH, and its settings are read from PATH too, as nanoGPT's configurator.py
would resolve them for the README's CPU run

    python train.py config/train_shakespeare_char.py --device=cpu --compile=False
        --eval_iters=20 --log_interval=1 --block_size=64 --batch_size=12 --n_layer=4
        --n_head=4 --n_embd=128 --max_iters=2000 --lr_decay_iters=2000 --dropout=0.0

(train.py's defaults, then the config file, then these overrides). The script checks that
they give truthgpt's `char-small` shape (4 layers, 4 heads, 128 wide, block 64, batch 12,
dropout 0, MLP 4x, tied embeddings) and the same optimiser settings (lr 1e-3 → 1e-4 over 2000
steps after 100 warm-up steps, AdamW betas (0.9, 0.99), weight decay 0.1 on ≥2-D weights,
grad clip 1.0), and tables every setting side by side. The one difference is `bias`: the
config file does not set it, so nanoGPT trains with train.py's default bias=False, while
char-small keeps TruthGPTConfig's bias=True. `--bias false` or `--bias true` gives both the
same (the results file then gets a `.biasfalse` / `.biastrue` suffix). Both models use the
built-in corpus's character vocabulary (80 symbols; nanoGPT's own tiny-Shakespeare has 65).

The nanoGPT step is train.py's on CPU, driven from this script (train.py itself is a script
with global config, so it cannot be imported):
  - dtype: train.py's default is 'bfloat16' or 'float16', but on device 'cpu' its `ctx` is
    nullcontext() (no autocast), so the model runs in float32, like truthgpt's fp32. Its
    GradScaler is built as train.py builds it (enabled iff dtype == 'float16', for 'cuda'):
    without CUDA, or with dtype bfloat16, it is disabled, so scale/unscale_/step/update pass
    straight through to the loss and `optimizer.step()`; the script calls them as train.py does.
  - optimiser: `model.configure_optimizers(weight_decay, learning_rate, (beta1, beta2), 'cpu')`,
    i.e. AdamW, not fused; on CPU torch then picks its single-tensor (for-loop) AdamW.
  - per step: set every group's lr (nanoGPT's schedule, computed with truthgpt's `lr_at`, the
    same formula), `logits, loss = model(X, Y)`, loss / gradient_accumulation_steps (1),
    `scaler.scale(loss).backward()`, `scaler.unscale_`, `clip_grad_norm_(model.parameters(),
    1.0)`, `scaler.step`, `scaler.update`, `zero_grad(set_to_none=True)`, and `loss.item()`
    (log_interval=1 reads the loss every step). Not timed, for either model: fetching batches
    (train.py's get_batch runs inside its timed loop), evaluation, printing, estimate_mfu.

truthgpt trains as a user trains: `TruthGPTOptimizationCore(config).train_step((x, y))`, config
= the char-small preset with `distance_type` each of `--kinds`, `device='cpu'`, the batch an
(inputs, targets) pair as the training loop passes it. Its step does a little more than
nanoGPT's: the learnable λ per head (one multiply of q, and λ's gradient), a finiteness check
of the loss and gradient norm before the update (one read of both), and per-step metrics
(MFU, memory, a history entry). Its AdamW is the fused implementation; nanoGPT uses torch's
for-loop AdamW on CPU.

Data: the built-in corpus (truthgpt.data), a character tokenizer fitted to all of it (as
`truthgpt prepare` does), its first 90 % (the train split), random windows drawn by
`RandomBatches` (y = x shifted by one, as nanoGPT's get_batch). Every model trains on the same
list of batches in every round. Both seed torch with 1337 and create their parameters in the
same order, so with `--bias false` nanoGPT and truthgpt-dot start from the same weights and
reach the same loss (the tables' "last loss": a check that it is the same model and update).

Timing: `--threads` torch threads (default 2) for all models; `--warmup` steps of each model
first, not timed; then `--rounds` rounds, each timing `--steps` steps of every model in turn
(the order rotated each round), so a burst of load elsewhere hits every model alike. Per model
the median round; ratios truthgpt-KIND / nanoGPT are the median of the per-round ratios. Load
averages at start and end are recorded. Writes benchmarks/results/nanogpt.threadsN.json and .md.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import hashlib
import importlib.util
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch

from truthgpt.config import TrainConfig, TruthGPTOptimizationCoreConfig, preset
from truthgpt.data import RandomBatches, TokenSplit, build_tokenizer, load_corpus, split_text
from truthgpt.nn.attention import kinds as distance_kinds
from truthgpt.training import TruthGPTOptimizationCore, lr_at

RESULTS = Path(__file__).resolve().parent / "results"
PRESET = "char-small"
NANOGPT_CONFIG = "config/train_shakespeare_char.py"
# The overrides of nanoGPT's README CPU run ("I only have a macbook").
CPU_ARGS = (
    "--device=cpu",
    "--compile=False",
    "--eval_iters=20",
    "--log_interval=1",
    "--block_size=64",
    "--batch_size=12",
    "--n_layer=4",
    "--n_head=4",
    "--n_embd=128",
    "--max_iters=2000",
    "--lr_decay_iters=2000",
    "--dropout=0.0",
)
NANO = "nanoGPT"
SEED = 1337  # the batches' seed: nanoGPT's and truthgpt's default seed

Batch = tuple[torch.Tensor, torch.Tensor]

# ------------------------------------------------------------------------------ nanoGPT side


def nanogpt_settings(root: Path) -> dict[str, Any]:
    """nanoGPT's globals for the README CPU run, resolved in configurator.py's order.

    train.py's config section (every top-level assignment before `config_keys`), then the
    config file, then CPU_ARGS. Literal values only; the one computed default that
    matters here, `dtype`, is evaluated as train.py writes it.
    """
    settings: dict[str, Any] = {}
    for node in ast.parse((root / "train.py").read_text(encoding="utf-8")).body:
        if not isinstance(node, ast.Assign) or not isinstance(node.targets[0], ast.Name):
            continue
        name = node.targets[0].id
        if name == "config_keys":
            break
        try:
            settings[name] = ast.literal_eval(node.value)
        except ValueError:
            if name == "dtype":
                expr = ast.Expression(node.value)
                settings[name] = eval(compile(expr, "train.py", "eval"), {"torch": torch})
    for node in ast.parse((root / NANOGPT_CONFIG).read_text(encoding="utf-8")).body:
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
            settings[node.targets[0].id] = ast.literal_eval(node.value)
    for arg in CPU_ARGS:
        key, value = arg.removeprefix("--").split("=")
        try:  # configurator.py: a literal if it parses as one, else the string
            new = ast.literal_eval(value)
        except (SyntaxError, ValueError):
            new = value
        if type(new) is not type(settings[key]):  # configurator.py asserts the same
            raise ValueError(f"nanoGPT setting {key}: {new!r} has a different type")
        settings[key] = new
    return settings


def import_nanogpt_model(root: Path) -> ModuleType:
    """nanoGPT's model.py, imported from the checkout."""
    path = root / "model.py"
    spec = importlib.util.spec_from_file_location("nanogpt_model", path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class NanoGPTTrainer:
    """nanoGPT's GPT with the optimiser, scaler and update of its train.py, on CPU."""

    def __init__(self, module: ModuleType, s: dict[str, Any], vocab_size: int, bias: bool):
        if s["device"] != "cpu" or s["gradient_accumulation_steps"] != 1:
            raise ValueError("this benchmark drives nanoGPT on CPU with one micro-batch per step")
        self.s = s
        self.device_type = "cpu"
        torch.manual_seed(1337)  # train.py: torch.manual_seed(1337 + seed_offset), offset 0
        self.model_args = dict(
            n_layer=s["n_layer"],
            n_head=s["n_head"],
            n_embd=s["n_embd"],
            block_size=s["block_size"],
            bias=bias,
            vocab_size=vocab_size,
            dropout=s["dropout"],
        )
        with contextlib.redirect_stdout(io.StringIO()):  # it prints parameter counts
            self.model = module.GPT(module.GPTConfig(**self.model_args))
            self.model.to(s["device"])
            self.optimizer = self.model.configure_optimizers(
                s["weight_decay"], s["learning_rate"], (s["beta1"], s["beta2"]), self.device_type
            )
        with warnings.catch_warnings():  # "GradScaler is enabled, but CUDA is not available"
            warnings.simplefilter("ignore")
            self.scaler = torch.amp.GradScaler("cuda", enabled=(s["dtype"] == "float16"))
        self.ctx = contextlib.nullcontext()  # train.py: no autocast when device_type == 'cpu'
        self.schedule = TrainConfig(
            learning_rate=s["learning_rate"],
            min_lr=s["min_lr"],
            warmup_steps=s["warmup_iters"],
            max_steps=s["lr_decay_iters"],
        )
        self.iter_num = 0
        self.last_loss = float("nan")

    def train_step(self, batch: Batch) -> None:
        s, model, optimizer, scaler = self.s, self.model, self.optimizer, self.scaler
        X, Y = batch
        lr = lr_at(self.iter_num, self.schedule) if s["decay_lr"] else s["learning_rate"]
        for param_group in optimizer.param_groups:
            param_group["lr"] = lr
        with self.ctx:
            _logits, loss = model(X, Y)
            loss = loss / s["gradient_accumulation_steps"]
        scaler.scale(loss).backward()
        if s["grad_clip"] != 0.0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), s["grad_clip"])
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        if self.iter_num % s["log_interval"] == 0:
            self.last_loss = loss.item() * s["gradient_accumulation_steps"]
        self.iter_num += 1


# ------------------------------------------------------------------------------ truthgpt side


def truthgpt_config(
    kind: str, vocab_size: int, bias: bool | None
) -> TruthGPTOptimizationCoreConfig:
    fields = preset(PRESET) | {"distance_type": kind, "device": "cpu"}
    if bias is not None:
        fields["bias"] = bias
    return TruthGPTOptimizationCoreConfig(vocab_size=vocab_size, **fields)


def compare_settings(s: dict[str, Any], cfg: TruthGPTOptimizationCoreConfig) -> list[dict]:
    """Every setting that shapes the model or the update, nanoGPT's beside truthgpt's."""
    rows = [
        ("layers", s["n_layer"], cfg.num_hidden_layers),
        ("heads", s["n_head"], cfg.num_attention_heads),
        ("width", s["n_embd"], cfg.hidden_size),
        ("MLP width", 4 * s["n_embd"], cfg.intermediate_size),  # nanoGPT: always 4 × n_embd
        ("block size / positions", s["block_size"], cfg.max_position_embeddings),
        ("sequence length", s["block_size"], cfg.block_size),
        ("batch size", s["batch_size"], cfg.batch_size),
        ("dropout", s["dropout"], cfg.hidden_dropout_prob),
        ("attention dropout", s["dropout"], cfg.attention_probs_dropout_prob),
        ("tied embeddings", True, cfg.tie_word_embeddings),  # nanoGPT: always tied
        ("layer norm eps", 1e-5, cfg.layer_norm_eps),  # nanoGPT: fixed in its LayerNorm
        ("bias", s["bias"], cfg.bias),
        ("learning rate", s["learning_rate"], cfg.learning_rate),
        ("min lr", s["min_lr"], cfg.min_lr),
        ("warm-up steps", s["warmup_iters"], cfg.warmup_steps),
        ("lr decay steps", s["lr_decay_iters"], cfg.lr_decay_steps or cfg.max_steps),
        ("weight decay", s["weight_decay"], cfg.weight_decay),
        ("beta1", s["beta1"], cfg.beta1),
        ("beta2", s["beta2"], cfg.beta2),
        ("grad clip", s["grad_clip"], cfg.grad_clip),
        (
            "gradient accumulation",
            s["gradient_accumulation_steps"],
            cfg.gradient_accumulation_steps,
        ),
        ("compute dtype", "fp32" if s["device"] == "cpu" else s["dtype"], cfg.precision),
    ]
    return [{"setting": n, NANO: a, "truthgpt": b, "same": a == b} for n, a, b in rows]


# ------------------------------------------------------------------------------ shared


def char_batches(block_size: int, batch_size: int, n: int, seed: int) -> tuple[list[Batch], int]:
    """n (x, y) batches of the built-in corpus's train split, and its character vocabulary."""
    text = load_corpus(["shakespeare"]).text
    tokenizer = build_tokenizer("char", text)
    train_text, _ = split_text(text)
    ids = tokenizer.encode_to_array(train_text).astype(np.uint16)
    sampler = RandomBatches(TokenSplit("train", ids, len(train_text)), block_size, batch_size, seed)
    return [sampler.batch(i) for i in range(n)], tokenizer.vocab_size


def parameter_counts(model: torch.nn.Module) -> dict[str, int]:
    """Parameters by role, tied weights once; λ is truthgpt's per-head log λ."""
    counts = {"total": 0, "token embedding (tied LM head)": 0, "positions": 0}
    counts |= {"biases": 0, "lambda": 0, "other weights": 0}
    for name, p in model.named_parameters():  # named_parameters drops the tied duplicate
        n = p.numel()
        counts["total"] += n
        if name.endswith("wte.weight") or name.endswith("lm_head.weight"):
            counts["token embedding (tied LM head)"] += n
        elif name.endswith("wpe.weight"):
            counts["positions"] += n
        elif name.endswith(".bias"):
            counts["biases"] += n
        elif name.endswith("log_lambda"):
            counts["lambda"] += n
        else:
            counts["other weights"] += n
    return counts


def nanogpt_source(root: Path) -> dict[str, str | None]:
    digest = hashlib.sha256((root / "model.py").read_bytes()).hexdigest()
    try:
        commit = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = None
    return {"path": str(root), "git_commit": commit, "model_py_sha256": digest}


def profile(steps: dict[str, Callable[[Batch], Any]], batch: Batch, rows: int) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    for name, step in steps.items():
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            start = time.perf_counter()
            step(batch)
            wall = time.perf_counter() - start
        print(f"\n== {name}: one training step, {wall * 1e3:.1f} ms under the profiler")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


def time_rounds(
    steps: dict[str, Callable[[Batch], Any]], batches: list[Batch], rounds: int
) -> dict[str, list[float]]:
    """ms per step of every model in every round; the order rotates from round to round."""
    names = list(steps)
    ms: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            step = steps[name]
            start = time.perf_counter()
            for batch in batches:
                step(batch)
            ms[name].append((time.perf_counter() - start) * 1e3 / len(batches))
    return ms


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nanogpt", type=Path, required=True, help="a karpathy/nanoGPT checkout")
    parser.add_argument("--kinds", default="dot,l1", help="truthgpt distance kinds")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per model per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps per model first")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument(
        "--bias",
        choices=("own", "false", "true"),
        default="own",
        help="own: each project's setting (nanoGPT False, char-small True); else both",
    )
    parser.add_argument("--profile", action="store_true", help="profile one step each and exit")
    parser.add_argument("--profile-rows", type=int, default=25)
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    args = parser.parse_args()
    kinds = args.kinds.split(",")
    unknown = [k for k in kinds if k not in distance_kinds.names()]
    if unknown:
        parser.error(f"unknown kind(s) {unknown}; choose from {', '.join(distance_kinds.names())}")
    if min(args.steps, args.rounds, args.warmup) < 1:
        parser.error("--steps, --rounds and --warmup must be positive")
    root = args.nanogpt.expanduser().resolve()
    for needed in ("model.py", "train.py", NANOGPT_CONFIG):
        if not (root / needed).is_file():
            parser.error(f"--nanogpt {root}: no {needed}; give a karpathy/nanoGPT checkout")
    torch.set_num_threads(args.threads)
    load_start = os.getloadavg()

    s = nanogpt_settings(root)
    shape = preset(PRESET)
    batches, vocab = char_batches(shape["block_size"], shape["batch_size"], args.steps, SEED)
    both_bias = None if args.bias == "own" else args.bias == "true"
    configs = {f"truthgpt-{k}": truthgpt_config(k, vocab, both_bias) for k in kinds}
    settings = compare_settings(s, next(iter(configs.values())))
    shape_rows = {"layers", "heads", "width", "MLP width", "block size / positions"}
    shape_rows |= {"sequence length", "batch size", "tied embeddings"}
    bad = [r for r in settings if r["setting"] in shape_rows and not r["same"]]
    if bad:
        raise SystemExit(f"nanoGPT's settings do not give {PRESET}'s model: {bad}")

    nano = NanoGPTTrainer(
        import_nanogpt_model(root), s, vocab, s["bias"] if both_bias is None else both_bias
    )
    cores = {name: TruthGPTOptimizationCore(cfg) for name, cfg in configs.items()}
    steps: dict[str, Callable[[Batch], Any]] = {NANO: nano.train_step}
    steps |= {name: core.train_step for name, core in cores.items()}
    models: dict[str, torch.nn.Module] = {NANO: nano.model}
    models |= {name: core.model for name, core in cores.items()}

    for step in steps.values():  # warm-up: allocation, the MFU peak probe, first-call costs
        for i in range(args.warmup):
            step(batches[i % len(batches)])
    if args.profile:
        profile(steps, batches[0], args.profile_rows)
        return 0

    ms = time_rounds(steps, batches, args.rounds)
    tokens = shape["batch_size"] * shape["block_size"]
    rows: dict[str, dict[str, Any]] = {}
    for name in steps:
        median = statistics.median(ms[name])
        per_round = [t / ref for t, ref in zip(ms[name], ms[NANO], strict=True)]
        rows[name] = {
            "ms_per_step": median,
            "ms_per_step_rounds": ms[name],
            "tokens_per_s": tokens / median * 1e3,
            "ratio_to_nanogpt": statistics.median(per_round),
            "ratio_to_nanogpt_rounds": per_round,
            "parameters": parameter_counts(models[name]),
            "last_loss": nano.last_loss if name == NANO else cores[name].history[-1]["loss"],
        }
    result = {
        "command": "python " + " ".join(["benchmarks/nanogpt.py", *sys.argv[1:]]),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "nanogpt": nanogpt_source(root)
        | {"run": " ".join(["train.py", NANOGPT_CONFIG, *CPU_ARGS])},
        "vocab_size": vocab,
        "tokens_per_step": tokens,
        "warmup": args.warmup,
        "steps": args.steps,
        "rounds": args.rounds,
        "bias": args.bias,
        "settings": settings,
        "load_average_start": load_start,
        "load_average_end": os.getloadavg(),
        "models": rows,
    }
    for name, row in rows.items():
        print(
            f"{name:16s} {row['ms_per_step']:7.2f} ms/step  {row['tokens_per_s']:8,.0f} tok/s"
            f"  ×{row['ratio_to_nanogpt']:.3f} nanoGPT  {row['parameters']['total']:,} params",
            flush=True,
        )
    args.out_dir.mkdir(parents=True, exist_ok=True)
    name = f"nanogpt.threads{args.threads}" + ("" if args.bias == "own" else f".bias{args.bias}")
    (args.out_dir / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out_dir / f"{name}.md").write_text(markdown(result))
    print(f"wrote {args.out_dir / name}.json and .md")
    return 0


def markdown(result: dict[str, Any]) -> str:
    start = ", ".join(f"{x:.2f}" for x in result["load_average_start"])
    end = ", ".join(f"{x:.2f}" for x in result["load_average_end"])
    nano = result["nanogpt"]
    lines = [
        f"Training step time, truthgpt `{PRESET}` beside nanoGPT's GPT of the same shape "
        f"({result['machine']}, {result['threads']} threads, torch {result['torch']}; nanoGPT "
        f"commit {nano['git_commit'] or 'unknown'}, model.py sha256 "
        f"{nano['model_py_sha256'][:12]}…, run as `{nano['run']}`). One step: forward, "
        f"backward, grad clip and AdamW update of one batch of {result['tokens_per_step']} "
        f"tokens (character-level built-in corpus, vocabulary {result['vocab_size']}), the same "
        f"batches for every model. Median of {result['rounds']} interleaved rounds of "
        f"{result['steps']} steps after {result['warmup']} warm-up steps; the ratio is the "
        f"median of the per-round ratios. Load average (1, 5, 15 min) {start} at the start, "
        f"{end} at the end: on a busy machine read the ratios, not the times. "
        f"Command: `{result['command']}`.",
        "",
        "| model | ms / step | rounds (ms) | tokens/s | ratio to nanoGPT | parameters "
        "| last loss |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, row in result["models"].items():
        spread = f"{min(row['ms_per_step_rounds']):.2f} – {max(row['ms_per_step_rounds']):.2f}"
        lines.append(
            f"| {name} | {row['ms_per_step']:.2f} | {spread} | {row['tokens_per_s']:,.0f} "
            f"| {row['ratio_to_nanogpt']:.3f} | {row['parameters']['total']:,} "
            f"| {row['last_loss']:.4f} |"
        )
    roles = list(next(iter(result["models"].values()))["parameters"])
    lines += ["", "Parameters by role (tied weights once):", ""]
    lines += ["| model | " + " | ".join(roles) + " |", "|---|" + "---|" * len(roles)]
    for name, row in result["models"].items():
        lines.append(f"| {name} | " + " | ".join(f"{row['parameters'][r]:,}" for r in roles) + " |")
    lines += ["", "Settings (nanoGPT's as its configurator resolves the run above):", ""]
    lines += ["| setting | nanoGPT | truthgpt | same |", "|---|---|---|---|"]
    for r in result["settings"]:
        same = "yes" if r["same"] else "**no**"
        lines.append(f"| {r['setting']} | {r[NANO]} | {r['truthgpt']} | {same} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
