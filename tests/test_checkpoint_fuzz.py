"""A seeded fuzzer of checkpoint loading: several hundred damaged copies of one small
checkpoint (`fuzz_damage.py` makes them), each loaded by both paths,
`TruthGPTModel.from_pretrained` and `load_core`.

Each copy must be refused with a `CheckpointError` that names the file (and, for an edited
JSON field, the field or one holding it), or load exactly what the original loads (the edit
was harmless: JSON formatting, a key nothing reads). No load may take 5 s, and memory stays
bounded: the cases run in a child process under RLIMIT_AS, which reports its peak RSS.

The damage: truncations, bit flips and appended bytes (the manifest's to catch) and, with the
manifest re-hashed so that only the checks behind it can catch them, edits of safetensors
headers, non-finite tensor values, JSON text that is not JSON, and JSON fields set to values
no field accepts (2^63, 10^400, 1e300, −1, NaN, ±inf, wrong types). Values a field does
accept are not generated: a re-hashed folder with a valid but different value is a different
checkpoint, not a damaged one. Two exceptions, by design: a `distance_type` this process has
not registered raises the registry's `ConfigError` (the folder may be sound; registering the
kind is the fix), and the caller's `extra` values and the measurements in `eval_history` are
kept as written, so only their types are edited.

Run alone: PYTHONPATH=src python tests/test_checkpoint_fuzz.py OUT_DIR [SEED]
"""

from __future__ import annotations

import hashlib
import json
import random
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bounded import CaseTimeout, cap_address_space, raise_on_alarm
from fuzz_damage import FILES, cases
from truthgpt.config import ConfigError, TruthGPTOptimizationCoreConfig
from truthgpt.data import build_tokenizer
from truthgpt.io import CheckpointError
from truthgpt.nn.model import TruthGPTModel
from truthgpt.training import load_core
from truthgpt.training.core import TruthGPTOptimizationCore

SEED = 20240611
TIME_LIMIT_S = 5.0  # for one load
MEMORY_GROWTH_LIMIT_MB = 1024  # peak RSS over all cases, above that after the first loads
MIN_CASES = 400
TEXT = "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKL.,\n"  # the vocabulary: 42 characters
LOADERS = ("pretrained", "core")


def test_checkpoint_fuzz(tmp_path: Path) -> None:
    start = time.perf_counter()
    child = subprocess.run(
        [sys.executable, __file__, str(tmp_path), str(SEED)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert child.returncode == 0, child.stdout[-3000:] + child.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    failures = [c for c in report["cases"] if c["problems"]]
    shown = "\n".join(f"{c['case']}: {'; '.join(c['problems'])}" for c in failures[:25])
    assert not failures, f"{len(failures)} of {len(report['cases'])} cases failed:\n{shown}"
    assert len(report["cases"]) >= MIN_CASES
    assert report["max_rss_growth_mb"] < MEMORY_GROWTH_LIMIT_MB
    assert time.perf_counter() - start < 120


# ------------------------------------------------------------------------------ the child


def main(out: Path, seed: int) -> None:
    torch.set_num_threads(1)
    good = make_checkpoint(out / "good")
    baseline = {name: fingerprint(name, load(name, good)) for name in LOADERS}
    cap_address_space()
    raise_on_alarm()
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    results = []
    for i, (case, damage) in enumerate(cases(random.Random(seed), good)):
        folder = out / f"case-{i:04d}"
        shutil.copytree(good, folder)
        field = damage(folder)
        problems = []
        for name in LOADERS:
            problems += [f"{name}: {p}" for p in run_case(name, folder, field, baseline[name])]
        results.append({"case": f"{i:04d} {case}", "problems": problems})
        shutil.rmtree(folder)
    growth = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024
    report = {"seed": seed, "cases": results, "max_rss_growth_mb": growth}
    (out / "report.json").write_text(json.dumps(report, indent=1))


def load(name: str, folder: Path) -> Any:
    return TruthGPTModel.from_pretrained(folder) if name == "pretrained" else load_core(folder)


def run_case(name: str, folder: Path, field: list | None, baseline: str) -> list[str]:
    """What is wrong with how loader `name` treats `folder` (nothing, when all is well)."""
    _scramble_rngs()
    start = time.perf_counter()
    signal.setitimer(signal.ITIMER_REAL, TIME_LIMIT_S)
    try:
        outcome: str | CheckpointError = fingerprint(name, load(name, folder))
    except CaseTimeout:
        return [f"took over {TIME_LIMIT_S} s"]
    except CheckpointError as err:
        outcome = err
    except ConfigError as err:
        allowed = field is not None and field[-1:] == ["distance_type"]
        if allowed and str(err).startswith("distance_type: unknown distance kind"):
            return []
        return [f"ConfigError {err}"]
    except Exception as err:  # anything else is a bug
        return [f"{type(err).__name__}: {str(err)[:300]}"]
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    elapsed = time.perf_counter() - start
    problems = [f"took {elapsed:.1f} s"] if elapsed > TIME_LIMIT_S else []
    if isinstance(outcome, str):
        if outcome != baseline:
            problems.append("loaded, but not what the original loads")
        return problems
    message = str(outcome)
    if str(folder) not in message or not any(f in message for f in FILES):
        problems.append(f"the error names no file: {message[:300]}")
    keys = [k for k in field or [] if isinstance(k, str)]
    if keys and not any(k in message for k in keys):
        problems.append(f"the error names none of {keys}: {message[:300]}")
    return problems


def _scramble_rngs() -> None:
    """Generators in a state no checkpoint holds, so that a restore which is skipped shows."""
    random.seed(99)
    np.random.seed(99)
    torch.manual_seed(99)


def fingerprint(name: str, loaded: Any) -> str:
    """A digest of everything a load gives back; for the core, also what its generators
    draw next."""
    h = hashlib.sha256()
    model = loaded if name == "pretrained" else loaded.raw_model
    h.update(model.config.to_json().encode())
    for key, tensor in sorted(model.state_dict().items()):
        h.update(key.encode() + tensor.detach().contiguous().numpy().tobytes())
    if name == "core":
        h.update(loaded.config.to_json().encode())
        h.update(json.dumps(loaded.state.state_dict(), sort_keys=True).encode())
        h.update(json.dumps(loaded.tokenizer.to_dict(), sort_keys=True).encode())
        optimizer = loaded.optimizer.state_dict()
        h.update(repr(optimizer["param_groups"]).encode())
        for index, values in sorted(optimizer["state"].items()):
            for key, tensor in sorted(values.items()):
                h.update(f"{index}.{key}".encode() + tensor.numpy().tobytes())
        h.update(repr((loaded.scaler, random.random(), random.gauss(0, 1))).encode())
        h.update(np.random.random(3).tobytes() + np.random.standard_normal(3).tobytes())
        h.update(torch.rand(3).numpy().tobytes() + torch.randn(3).numpy().tobytes())
    return h.hexdigest()


def make_checkpoint(folder: Path) -> Path:
    """A tiny trained run's checkpoint, with every file and field a run writes."""
    tokenizer = build_tokenizer("char", TEXT)
    config = TruthGPTOptimizationCoreConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=8,
        block_size=8,
        batch_size=2,
        warmup_steps=1,
        max_steps=10,
        device="cpu",
        peak_flops=1e12,
    )
    core = TruthGPTOptimizationCore(config, tokenizer=tokenizer, chars_per_token=1.0)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        core.train_step({"input_ids": torch.randint(0, config.vocab_size, (2, 8), generator=g)})
    core.record_eval({"loss": 3.5, "perplexity": 33.1, "tokens": 16.0})
    return core.save_checkpoint(folder, val_loss=3.5)


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else SEED)
