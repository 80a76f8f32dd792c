"""Kill -9 soak: does `truthgpt train --resume` continue a run killed at any moment exactly?

Each trial starts `truthgpt train` on a tiny config in a subprocess, sends it SIGKILL at a
random moment of its training (steps, evaluations, checkpoint writes), resumes it with
`truthgpt train --resume`, and compares the result with one uninterrupted run: the final
weights and AdamW moments bit for bit, the final counters, and every loss in metrics.jsonl
(train and validation) at its step. On CPU they must be equal. Writes
benchmarks/results/soak.json and soak.md.

    python benchmarks/soak.py [--trials 10] [--steps 40] [--checkpoint-every 2] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

RESULTS = Path(__file__).parent / "results"
SRC = Path(__file__).resolve().parent.parent / "src"
TEXT = "Now is the winter of our discontent\nMade glorious summer by this sun of York.\n" * 60
TINY = {
    "hidden_size": 32,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "block_size": 16,
    "batch_size": 4,
    "eval_interval": 5,
    "eval_batches": 2,
    "warmup_steps": 2,
    "log_interval": 1,
    "keep_checkpoints": 2,
}


def truthgpt(*args: str) -> list[str]:
    return [sys.executable, "-m", "truthgpt", *args]


def environment() -> dict[str, str]:
    """The library from this checkout, one thread everywhere (the same in every process, so
    that CPU results can be equal bit for bit)."""
    path = os.pathsep.join(p for p in (str(SRC), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def train_args(data: Path, run: Path, steps: int, every: int) -> list[str]:
    sets = [arg for key, value in TINY.items() for arg in ("--set", f"{key}={value}")]
    return truthgpt(
        "train", "--data", str(data), "--out", str(run), "--distance", "l1", "--device", "cpu",
        "--max-steps", str(steps), "--checkpoint-every", str(every), *sets,
    )  # fmt: skip


def start(command: list[str], log: Path) -> subprocess.Popen:
    with log.open("ab") as out:
        return subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=environment())


def wait_for(path: Path, process: subprocess.Popen, timeout: float = 120.0) -> bool:
    """Until `path` exists and is not empty (for metrics.jsonl: the first step is logged);
    False if the process ended first."""
    deadline = time.monotonic() + timeout
    while not (path.exists() and path.stat().st_size > 0):
        if process.poll() is not None or time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


def losses(run: Path) -> tuple[dict[tuple[str, int], float], int]:
    """(event, step) -> loss for every row of metrics.jsonl, and how many lines were torn
    (a kill in the middle of a write). A step logged twice (before a kill and after the
    resume) must have the same loss both times, or it is stored as NaN."""
    rows: dict[tuple[str, int], float] = {}
    torn = 0
    for line in (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            torn += 1
            continue
        if row.get("event") in ("train", "eval_val") and "loss" in row:
            key = (row["event"], int(row["step"]))
            loss = float(row["loss"])
            rows[key] = loss if rows.get(key, loss) == loss else float("nan")
    return rows, torn


def final_state(run: Path) -> dict[str, Any]:
    """The latest checkpoint of a run: its step, weights, AdamW moments and counters."""
    checkpoints = run / "checkpoints"
    name = (checkpoints / "latest").read_text(encoding="utf-8").strip()
    folder = checkpoints / name
    state = json.loads((folder / "trainer_state.json").read_text(encoding="utf-8"))
    return {
        "folder": name,
        "weights": safetensors.torch.load_file(folder / "model.safetensors"),
        "optimizer": safetensors.torch.load_file(folder / "optimizer.safetensors"),
        "counters": {k: state[k] for k in ("step", "tokens_seen", "best_val_loss")},
        "eval_history": state["eval_history"],
    }


def differences(run: Path, reference: dict[str, Any]) -> list[str]:
    """What differs between a resumed run and the uninterrupted one (nothing: exact)."""
    found = []
    got = final_state(run)
    for part in ("weights", "optimizer"):
        ours, theirs = got[part], reference[part]
        if ours.keys() != theirs.keys():
            found.append(f"{part}: other tensors")
            continue
        unequal = [k for k in ours if not torch.equal(ours[k], theirs[k])]
        if unequal:
            found.append(f"{part}: {len(unequal)} tensors differ, e.g. {unequal[0]}")
    for part in ("folder", "counters", "eval_history"):
        if got[part] != reference[part]:
            found.append(f"{part}: {str(got[part])[:150]} vs {str(reference[part])[:150]}")
    rows, torn = losses(run)
    if torn:
        found.append(f"metrics.jsonl: {torn} torn line(s)")
    for key, loss in reference["losses"].items():
        if key not in rows:
            found.append(f"metrics.jsonl: no {key[0]} loss at step {key[1]}")
        elif rows[key] != loss:
            found.append(f"metrics.jsonl: {key[0]} loss at step {key[1]}: {rows[key]} vs {loss}")
    return found


def checkpoint_steps(run: Path) -> list[int]:
    folder = run / "checkpoints"
    if not folder.is_dir():
        return []
    return sorted(
        int(p.name.split("-")[1])
        for p in folder.iterdir()
        if p.name.startswith("step-") and (p / "manifest.json").is_file()
    )


def trial(i: int, rng: random.Random, work: Path, data: Path, ref: dict, args) -> dict:
    run, log = work / f"run-{i:03d}", work / f"run-{i:03d}.log"
    process = start(train_args(data, run, args.steps, args.checkpoint_every), log)
    began = wait_for(run / "metrics.jsonl", process)
    delay = rng.uniform(0, 1.1 * ref["train_s"])
    time.sleep(delay)
    finished = process.poll() is not None
    if not finished:
        os.kill(process.pid, signal.SIGKILL)
    process.wait()
    result: dict[str, Any] = {
        "trial": i,
        "killed_after_s": round(delay, 3) if began else None,
        "finished_before_kill": finished,
        "checkpoints_at_kill": checkpoint_steps(run),
        "leftovers_at_kill": sorted(
            p.name
            for p in (run / "checkpoints").iterdir()
            if not (p.name.startswith("step-") or p.name in ("latest", "best"))
        )
        if (run / "checkpoints").is_dir()
        else [],
    }
    resumed = subprocess.run(
        truthgpt("train", "--resume", str(run)),
        capture_output=True,
        text=True,
        env=environment(),
        timeout=600,
    )
    with log.open("a", encoding="utf-8") as out:
        out.write(resumed.stdout + resumed.stderr)
    if resumed.returncode != 0:
        tail = (resumed.stderr or resumed.stdout).strip().splitlines()[-1:] or [""]
        result.update(outcome="resume failed", problems=[tail[0][:300]])
        return result
    problems = differences(run, ref)
    result.update(outcome="exact" if not problems else "differs", problems=problems)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--checkpoint-every", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    load_at_start = os.getloadavg()[0]  # the machine is shared: say how busy it was
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory(prefix="truthgpt-soak-") as tmp:
        work = Path(tmp)
        (work / "text.txt").write_text(TEXT, encoding="utf-8")
        data = work / "data"
        prepare = ["prepare", "--corpus", str(work / "text.txt"), "--tokenizer", "char"]
        subprocess.run(truthgpt(*prepare, "--out", str(data)), check=True, env=environment())

        ref_run = work / "reference"
        began = time.perf_counter()
        process = start(
            train_args(data, ref_run, args.steps, args.checkpoint_every), work / "ref.log"
        )
        wait_for(ref_run / "metrics.jsonl", process)
        training = time.perf_counter()
        last = ref_run / "checkpoints" / f"step-{args.steps:07d}" / "manifest.json"
        wait_for(last, process)
        train_s = time.perf_counter() - training  # steps, evaluations, checkpoints
        if process.wait() != 0:
            raise RuntimeError((work / "ref.log").read_text()[-2000:])
        reference = {
            **final_state(ref_run),
            "losses": losses(ref_run)[0],
            "wall_s": time.perf_counter() - began,
            "train_s": train_s,
        }
        trials = []
        for i in range(args.trials):
            trials.append(trial(i, rng, work, data, reference, args))
            t = trials[-1]
            print(
                f"trial {i}: killed after {t['killed_after_s']} s, checkpoints "
                f"{t['checkpoints_at_kill']}: {t['outcome']} {'; '.join(t['problems'])}"
            )

    summary = {
        "trials": len(trials),
        "resumed_exactly": sum(t["outcome"] == "exact" for t in trials),
        "failures": sum(t["outcome"] != "exact" for t in trials),
        "killed_before_first_checkpoint": sum(not t["checkpoints_at_kill"] for t in trials),
        "finished_before_kill": sum(t["finished_before_kill"] for t in trials),
    }
    command = (
        f"python benchmarks/soak.py --trials {args.trials} --steps {args.steps} "
        f"--checkpoint-every {args.checkpoint_every} --seed {args.seed}"
    )
    meta = {
        "command": command,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores",
        "torch": torch.__version__,
        "load_average_at_start": load_at_start,
        "config": {**TINY, "distance_type": "l1", "device": "cpu", "max_steps": args.steps},
        "reference": {
            "final_checkpoint": reference["folder"],
            "wall_s": round(reference["wall_s"], 2),
            "train_s": round(reference["train_s"], 2),
        },
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "soak.json").write_text(
        json.dumps({**meta, "summary": summary, "trials": trials}, indent=2) + "\n",
        encoding="utf-8",
    )
    lines = [
        "# Kill -9 soak",
        "",
        f"`{command}` on {meta['machine']} (1-minute load average {load_at_start:.1f} at the "
        "start). Each trial starts `truthgpt train` (the tiny l1 config in soak.json, on CPU), "
        "sends SIGKILL at a random moment after its first step (up to 1.1 × the "
        f"{reference['train_s']:.1f} s the uninterrupted run took from its first step to its "
        "last checkpoint), resumes with "
        "`truthgpt train --resume` and compares with the uninterrupted run: final weights and "
        "AdamW moments bit for bit, counters, and every train and validation loss at its step.",
        "",
        f"**{summary['resumed_exactly']} of {summary['trials']} trials resumed exactly; "
        f"{summary['failures']} failed** ({summary['killed_before_first_checkpoint']} killed "
        f"before the first checkpoint, {summary['finished_before_kill']} finished before the "
        "kill).",
        "",
        "| trial | killed after s | checkpoints at the kill | leftovers | outcome | problems |",
        "|---:|---:|---|---|---|---|",
    ]
    for t in trials:
        steps = ", ".join(map(str, t["checkpoints_at_kill"])) or "none"
        leftovers = ", ".join(t["leftovers_at_kill"]) or "-"
        lines.append(
            f"| {t['trial']} | {t['killed_after_s']} | {steps} | {leftovers} | {t['outcome']} | "
            f"{'; '.join(t['problems']) or '-'} |"
        )
    (RESULTS / "soak.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
