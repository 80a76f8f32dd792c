"""Hugging Face models with distance attention: Trainer and decoding speed, sdpa vs eager vs
truthgpt_l1, and how many steps a dot-product model needs to recover its loss after an L1
conversion.

The model is examples/hf_trainer.py's Llama shape (4 layers, 4 heads with 2 key/value heads,
width 128, RoPE), random-initialised, on character blocks of the built-in corpus.

speed (default): each round builds the model with every attention implementation (same seed)
and runs, in turn, an HF Trainer run of --steps steps (tokens/s from the Trainer's own
train_runtime) and a greedy `generate()` of --new-tokens tokens after a --prompt-token prompt
with the KV cache (tokens/s). The implementations alternate inside every round; the figure is
the median over --rounds rounds, and so is each ratio to sdpa (one ratio per round). The load
average is recorded before and after: the machine is shared, read the ratios.

    python benchmarks/hf_models.py [--rounds 5] [--steps 30] [--threads 2]

finetune: train a dot-product (sdpa) model for --pretrain-steps steps: the "pretrained"
checkpoint (save_pretrained, reloaded). Then continue it for --finetune-steps steps twice from
that folder, same data order: once converted to L1 (`use_distance_attention`, default λ), once
still dot-product (the control), measuring the validation loss every --eval-every steps. It
reports the first step at which the L1 model's validation loss is back at the checkpoint's.

    python benchmarks/hf_models.py --finetune [--pretrain-steps 600] [--finetune-steps 300]

Writes benchmarks/results/hf_models.{json,md} (speed at 2 threads; hf_models.threadsN.* at N
threads) or hf_finetune.{json,md}.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import AutoModelForCausalLM, TrainerCallback

from truthgpt.hf import use_distance_attention

RESULTS = Path(__file__).resolve().parent / "results"
EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "hf_trainer.py"
# truthgpt_dot: the same function and plumbing as truthgpt_l1 on the SDPA path, so the gap to
# sdpa is what the integration itself costs.
ATTNS = ("sdpa", "eager", "truthgpt_dot", "truthgpt_l1")


def example() -> Any:
    """examples/hf_trainer.py as a module: the model shape, data and Trainer set-up."""
    spec = importlib.util.spec_from_file_location("example_hf_trainer", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def machine() -> dict[str, Any]:
    return {
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


# --------------------------------------------------------------------------------------------
# speed


def clocks() -> tuple[float, float]:
    """Wall and process CPU seconds: on a shared machine CPU time is the steadier of the two
    (it does not count the time the process waits for a core)."""
    return time.perf_counter(), time.process_time()


def train_tokens_per_s(
    ex: Any, model: Any, data: Any, args: argparse.Namespace
) -> tuple[float, float]:
    """Tokens per wall second and per CPU second of one HF Trainer run (its steps, not its
    set-up)."""
    marks = {}

    class Runtime(TrainerCallback):
        def on_train_begin(self, *a, **k):
            marks["start"] = clocks()

        def on_train_end(self, *a, **k):
            marks["end"] = clocks()

    ex.train(model, data, steps=args.steps, batch_size=args.batch, callbacks=[Runtime()])
    tokens = args.steps * args.batch * args.block
    return tuple(tokens / (e - s) for s, e in zip(marks["start"], marks["end"], strict=True))


@torch.no_grad()
def decode_tokens_per_s(model: Any, prompt: torch.Tensor, new_tokens: int) -> tuple[float, float]:
    """Greedy generate() with the KV cache: new tokens per wall and per CPU second (after one
    short warm-up call: the first generate() of a model sets up more than decoding)."""
    model.eval()
    model.generate(prompt, max_new_tokens=2, do_sample=False)
    start = clocks()
    model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    return tuple(new_tokens / (e - s) for s, e in zip(start, clocks(), strict=True))


def speed(args: argparse.Namespace) -> dict[str, Any]:
    ex = example()
    tokenizer, train_ids, val_ids, _ = ex.shakespeare_chars(200_000)
    config = ex.llama_config(tokenizer.vocab_size)
    data = ex.CharBlocks(train_ids, args.block)
    prompt = val_ids[: args.prompt][None]
    whats = ("train", "train_cpu", "decode", "decode_cpu")
    rows: dict[str, dict[str, list[float]]] = {a: {w: [] for w in whats} for a in ATTNS}
    for r in range(args.rounds):
        order = ATTNS if r % 2 == 0 else ATTNS[::-1]  # alternate who runs first
        for attn in order:
            model = ex.build_model(config, attn)
            for what, (wall, cpu) in (
                ("train", train_tokens_per_s(ex, model, data, args)),
                ("decode", decode_tokens_per_s(model, prompt, args.new_tokens)),
            ):
                rows[attn][what].append(wall)
                rows[attn][what + "_cpu"].append(cpu)
        done = ", ".join(
            f"{a} train {rows[a]['train'][-1]:.0f} decode {rows[a]['decode'][-1]:.1f} tok/s"
            for a in ATTNS
        )
        print(f"round {r + 1}/{args.rounds}: {done}", flush=True)
    result: dict[str, Any] = {"vocab_size": tokenizer.vocab_size, "results": {}}
    for attn in ATTNS:
        entry = {}
        for what in whats:
            values = rows[attn][what]
            ratios = [v / s for v, s in zip(values, rows["sdpa"][what], strict=True)]
            entry[what] = {
                "tokens_per_s_median": statistics.median(values),
                "tokens_per_s": values,
                "ratio_to_sdpa_median": statistics.median(ratios),
                "ratio_to_sdpa": ratios,
            }
        result["results"][attn] = entry
    return result


# --------------------------------------------------------------------------------------------
# fine-tuning a dot-product model into L1


class EvalEvery(TrainerCallback):
    """Validation loss every `every` steps (and at step 0), into `curve`."""

    def __init__(self, ex: Any, val_ids: torch.Tensor, block: int, every: int) -> None:
        self.ex, self.val_ids, self.block, self.every = ex, val_ids, block, every
        self.curve: list[tuple[int, float]] = []

    def measure(self, model: Any, step: int) -> None:
        was_training = model.training
        self.curve.append((step, self.ex.eval_loss(model, self.val_ids, self.block)))
        model.train(was_training)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.measure(model, 0)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.every == 0:
            self.measure(model, state.global_step)


def finetune(args: argparse.Namespace) -> dict[str, Any]:
    ex = example()
    tokenizer, train_ids, val_ids, unigram = ex.shakespeare_chars(args.chars)
    val_ids = val_ids[: args.val_chars]
    config = ex.llama_config(tokenizer.vocab_size)
    data = ex.CharBlocks(train_ids, args.block)
    result: dict[str, Any] = {"unigram_entropy": unigram}
    with tempfile.TemporaryDirectory() as folder:
        model = ex.build_model(config, "sdpa")
        start = time.perf_counter()
        ex.train(model, data, steps=args.pretrain_steps, batch_size=args.batch, lr=args.lr)
        result["pretrain_seconds"] = time.perf_counter() - start
        model.save_pretrained(folder)
        base = ex.eval_loss(model, val_ids, args.block)
        result["checkpoint_val_loss"] = base
        print(f"dot-product checkpoint: validation loss {base:.4f}", flush=True)
        for run in ("l1", "dot"):
            model = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="sdpa")
            if run == "l1":
                use_distance_attention(model, "l1")
            curve = EvalEvery(ex, val_ids, args.block, args.eval_every)
            ex.train(
                model,
                data,
                steps=args.finetune_steps,
                batch_size=args.batch,
                lr=args.finetune_lr,
                seed=1,  # another data order than pre-training's, the same for both runs
                callbacks=[curve],
            )
            back = next((s for s, loss in curve.curve if loss <= base), None)
            result[run] = {"curve": curve.curve, "steps_to_checkpoint_loss": back}
            print(f"{run}: {curve.curve}; back at the checkpoint's loss after {back}", flush=True)
    return result


# --------------------------------------------------------------------------------------------
# reports


def speed_markdown(result: dict[str, Any], command: str) -> str:
    a = result["args"]
    lines = [
        "# Hugging Face models: Trainer and decoding speed, sdpa vs eager vs truthgpt_dot/l1",
        "",
        f"`{command}` on {result['machine']['cpu_count']} shared CPU cores, "
        f"{a['threads']} torch threads; torch {result['machine']['torch']}, transformers "
        f"{result['machine']['transformers']}. Load average (1, 5, 15 min) "
        f"{result['load_average_start']} at the start, {result['load_average_end']} at the end.",
        "",
        "Model: examples/hf_trainer.py's Llama shape (4 layers, 4 heads / 2 key-value heads, "
        f"width 128, RoPE, vocab {result['vocab_size']}). Training: HF Trainer, "
        f"{a['steps']} steps of {a['batch']}×{a['block']} tokens, tokens/s over the Trainer's "
        f"steps. Decoding: greedy generate() with the KV cache, {a['prompt']}-token prompt, "
        f"{a['new_tokens']} new tokens, batch 1. Median of {a['rounds']} interleaved rounds; "
        "ratio = the median of the per-round ratios to sdpa.",
        "",
        "tok/s counts wall time; *CPU* columns count the process's CPU time instead (steadier "
        "when other processes compete for the cores).",
        "",
        "| attention | train tok/s | train ratio | train ratio (CPU) | decode tok/s "
        "| decode ratio | decode ratio (CPU) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for attn in ATTNS:
        r = result["results"][attn]
        cells = [f"{r['train']['tokens_per_s_median']:.0f}"]
        cells += [f"{r[w]['ratio_to_sdpa_median']:.2f}×" for w in ("train", "train_cpu")]
        cells += [f"{r['decode']['tokens_per_s_median']:.1f}"]
        cells += [f"{r[w]['ratio_to_sdpa_median']:.2f}×" for w in ("decode", "decode_cpu")]
        lines.append(f"| {attn} | " + " | ".join(cells) + " |")
    l1 = result["results"]["truthgpt_l1"]
    spread = ", ".join(
        f"{w.replace('_cpu', ' (CPU)')} {min(l1[w]['ratio_to_sdpa']):.2f}–"
        f"{max(l1[w]['ratio_to_sdpa']):.2f}"
        for w in l1
    )
    lines += ["", f"Per-round truthgpt_l1/sdpa ratios: {spread}."]
    return "\n".join(lines) + "\n"


def finetune_markdown(result: dict[str, Any], command: str) -> str:
    a = result["args"]
    base = result["checkpoint_val_loss"]
    lines = [
        "# Fine-tuning a dot-product Hugging Face model into L1 attention",
        "",
        f"`{command}`; torch {result['machine']['torch']}, transformers "
        f"{result['machine']['transformers']}. Load average {result['load_average_start']} at "
        f"the start, {result['load_average_end']} at the end.",
        "",
        f"The checkpoint: examples/hf_trainer.py's Llama shape trained with sdpa for "
        f"{a['pretrain_steps']} Trainer steps ({a['batch']}×{a['block']} characters, lr "
        f"{a['lr']}) on the first {a['chars']:,} characters of the built-in corpus, saved and "
        f"reloaded. Validation loss {base:.4f} nats on the {a['val_chars']:,} characters that "
        f"follow (unigram entropy {result['unigram_entropy']:.3f}). Both continuations: "
        f"{a['finetune_steps']} more steps, lr {a['finetune_lr']}, the same data order.",
        "",
        "| step | L1 conversion | dot-product control |",
        "|---:|---:|---:|",
    ]
    dot = dict(result["dot"]["curve"])
    for step, loss in result["l1"]["curve"]:
        lines.append(f"| {step} | {loss:.4f} | {dot.get(step, float('nan')):.4f} |")
    l1_back, dot_back = (result[r]["steps_to_checkpoint_loss"] for r in ("l1", "dot"))
    lines += [
        "",
        f"L1 back at the checkpoint's validation loss ({base:.4f}) after: "
        f"{l1_back if l1_back is not None else 'not within ' + str(a['finetune_steps'])} steps "
        f"(dot-product control: {dot_back} steps). Measured at every {a['eval_every']} steps, on "
        "this one small model and corpus only.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--finetune", action="store_true", help="the L1-conversion measurement")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=30, help="Trainer steps per speed run")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--block", type=int, default=128)
    parser.add_argument("--prompt", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--chars", type=int, default=1_000_000)
    parser.add_argument("--val-chars", type=int, default=32_768)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--pretrain-steps", type=int, default=600)
    parser.add_argument("--finetune-steps", type=int, default=300)
    parser.add_argument("--finetune-lr", type=float, default=1e-3)
    parser.add_argument("--eval-every", type=int, default=25)
    parser.add_argument("--out", type=Path, default=RESULTS, help="results directory")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    command = "python benchmarks/hf_models.py " + " ".join(sys.argv[1:])
    result: dict[str, Any] = {
        "command": command.strip(),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "machine": machine(),
        "load_average_start": load_average(),
    }
    if args.finetune:
        result.update(finetune(args))
        name, markdown = "hf_finetune", finetune_markdown
    else:
        result.update(speed(args))
        name = "hf_models" if args.threads == 2 else f"hf_models.threads{args.threads}"
        markdown = speed_markdown
    result["load_average_end"] = load_average()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / f"{name}.md").write_text(markdown(result, result["command"]))
    print((args.out / f"{name}.md").read_text())


if __name__ == "__main__":
    main()
