"""A seeded fuzzer of run folders on a hostile file system: every file, pointer and folder of
a small trained run replaced in turn by a link to /dev/zero, a link to itself, a link to the
same entry of another run (hidden_size 64, not 32), a FIFO, a folder, an empty file or a
sparse 2 GB file, and every command that reads a run (`eval`, `generate`, `analyze`,
`export-hf`, `train --resume`, `TruthGPTModel.from_pretrained`, `load_core`) run on the copy.

Each case must end with exit code 0 (the command went on from what is sound, saying so in a
line when it passed over the newest checkpoint, damaged) or 2 with one error line naming a
path of the run; never a traceback, never 5 s more than the sound copy takes (analyze draws
its plots in ~4 s), memory bounded (RLIMIT_AS, peak RSS growth under 1 GB, as in
`test_checkpoint_fuzz.py`). Nothing outside the run folder may change (the other run, the
data, /dev/zero, the folder around the run: only a fresh --out may appear), and nothing inside
it either, except what `train --resume` writes.

The cases run in two child processes (torch is imported once in each), each through
`truthgpt.cli.main` (or the library call) in-process under an interval timer. The suite runs
a seeded sample (each damage with one fast reader, a few with each slow command, and the
damages that once found bugs); the full product runs alone:

    PYTHONPATH=src python tests/test_hostile_fs_fuzz.py OUT_DIR [SEED] [--full]
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import random
import resource
import shutil
import signal
import stat
import subprocess
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

import pytest

from bounded import CaseTimeout, cap_address_space, raise_on_alarm

SEED = 20261207
TIME_LIMIT_S = 5.0  # for one case
MEMORY_GROWTH_LIMIT_MB = 1024  # peak RSS of a child, above that after its first case
HUGE = 2 * 2**30  # the sparse file's size
TEXT = "Now is the winter of our discontent\nMade glorious summer.\n" * 40
TINY = ["--set", "hidden_size=32", "--set", "num_hidden_layers=1", "--set"]
TINY += ["num_attention_heads=2", "--set", "block_size=16", "--set", "batch_size=4"]
TINY += ["--set", "eval_interval=3", "--set", "eval_batches=2", "--set", "warmup_steps=1"]
TINY += ["--checkpoint-every", "2", "--max-steps", "4"]
KINDS = ("dev-zero", "loop", "other-run", "fifo", "folder", "empty", "huge")
COMMANDS = ("eval", "generate", "analyze", "export-hf", "train-resume", "pretrained", "core")
FAST = ("eval", "generate", "pretrained", "core")  # the sample: each damage with one of these
GROUPS = {"a": ("analyze", "pretrained", "core"), "b": ("train-resume", "export-hf", "generate")}
GROUPS["b"] += ("eval",)  # one child for each group, the two at once
SLOW = {"export-hf": 16, "train-resume": 10, "analyze": 3}  # and this many with each of these
# Always with train-resume: damages that once wrote outside the run, failed or took too long.
FOUND = [(t, k) for t in (".lock", "checkpoints") for k in KINDS] + [("metrics.jsonl", "huge")]
CHECKPOINT_FILES = ("manifest.json", "config.json", "model.safetensors", "trainer_state.json")
CHECKPOINT_FILES += ("optimizer.safetensors", "tokenizer.json")
TOP = ("run.json", "metrics.jsonl", "report.json", ".truthgpt.json", ".lock", "checkpoints")
STEPS = ("step-0000002", "step-0000004")
TARGETS = [*TOP, "checkpoints/latest", "checkpoints/best"]
TARGETS += [f"checkpoints/{s}" for s in STEPS]
TARGETS += [f"checkpoints/{s}/{f}" for s in STEPS for f in CHECKPOINT_FILES]


@pytest.mark.slow(20)
def test_hostile_fs_fuzz(tmp_path: Path) -> None:
    start = time.perf_counter()
    report = fuzz(tmp_path, SEED, full=False)
    failures = [c for c in report["cases"] if c["problems"]]
    shown = "\n".join(f"{c['case']}: {'; '.join(c['problems'])}" for c in failures[:25])
    assert not failures, f"{len(failures)} of {len(report['cases'])} cases failed:\n{shown}"
    assert len(report["cases"]) >= len(TARGETS) * len(KINDS) + sum(SLOW.values())
    assert max(report["max_rss_growth_mb"].values()) < MEMORY_GROWTH_LIMIT_MB
    assert time.perf_counter() - start < 120


# ------------------------------------------------------------------------------ the parent


def all_cases(rng: random.Random, full: bool) -> list[tuple[str, str, str]]:
    """(command, target, kind): the full product, or a sample of it: each damage with one of
    the fast readers, a few with each slow command, and the damages that once found bugs."""
    damages = [(target, kind) for target in TARGETS for kind in KINDS]
    if full:
        return [(c, t, k) for c in COMMANDS for t, k in damages]
    cases = [(rng.choice(FAST), t, k) for t, k in damages]
    for command, count in SLOW.items():
        cases += [(command, t, k) for t, k in rng.sample(damages, count)]
    found = [("train-resume", t, k) for t, k in FOUND]
    return cases + [case for case in found if case not in cases]


def fuzz(root: Path, seed: int, full: bool) -> dict:
    """Make the runs, run the cases in two children (one per group of commands, at once),
    and gather what the children report."""
    make_runs(root)
    by_group: dict[str, list] = {group: [] for group in GROUPS}
    for command, target, kind in all_cases(random.Random(seed), full):
        group = next(g for g, commands in GROUPS.items() if command in commands)
        by_group[group].append([command, target, kind])
    results: list[dict] = []
    growth: dict[str, float] = {}
    tries: dict[str, int] = {}
    pending = list(GROUPS)
    running: list[tuple[str, subprocess.Popen, float]] = []
    while pending or running:
        while pending:
            group = pending.pop(0)
            (root / f"cases-{group}.json").write_text(json.dumps(by_group[group]))
            child = subprocess.Popen(
                [sys.executable, __file__, "--child", group, str(root)],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            running.append((group, child, time.monotonic()))
        time.sleep(0.2)
        for item in list(running):
            group, child, began = item
            limit = 120 + 4 * TIME_LIMIT_S * len(by_group[group])
            if child.poll() is None and time.monotonic() - began < limit:
                continue
            if child.poll() is None:
                child.kill()
            output = child.communicate()[0]
            running.remove(item)
            done = read_results(root / f"results-{group}.jsonl")
            results += done["cases"]
            growth[group] = max(growth.get(group, 0.0), done.get("max_rss_growth_mb", 0.0))
            left = by_group[group][len(done["cases"]) :]
            tries[group] = tries.get(group, 0) + 1
            if child.returncode != 0 or left:
                case = " ".join(left[0]) if left else group
                problem = f"the child ended with {child.returncode}: {output[-1500:]}"
                results.append({"case": case, "problems": [problem]})
                if len(left) > 1 and tries[group] < 5:  # the cases after it, in a new child
                    by_group[group] = left[1:]
                    (root / f"results-{group}.jsonl").unlink()
                    pending.append(group)
    report = {"seed": seed, "full": full, "cases": results, "max_rss_growth_mb": growth}
    (root / "report.json").write_text(json.dumps(report, indent=1))
    return report


def read_results(path: Path) -> dict:
    out: dict[str, Any] = {"cases": []}
    if not path.exists():
        return out
    for line in path.read_text().splitlines():
        row = json.loads(line)
        if "case" in row:
            out["cases"].append(row)
        else:
            out.update(row)
    return out


def make_runs(root: Path) -> None:
    """root/data, root/pristine (the run every case copies: checkpoints at steps 2 and 4,
    `latest` and `best`) and root/other (the same at hidden_size 64)."""
    from truthgpt.cli import main

    (root / "text.txt").write_text(TEXT)
    prepare = ["prepare", "--corpus", str(root / "text.txt"), "--tokenizer", "char"]
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        assert main([*prepare, "--out", str(root / "data")]) == 0
        for name, extra in (("pristine", []), ("other", ["--set", "hidden_size=64"])):
            argv = ["train", "--data", str(root / "data"), "--out", str(root / name), *TINY]
            assert main([*argv, *extra]) == 0
    for name in ("pristine", "other"):
        for target in TARGETS:
            assert os.path.lexists(root / name / target), f"{name}/{target}"


# ------------------------------------------------------------------------------ the child


def child(group: str, root: Path) -> None:
    import torch

    torch.set_num_threads(1)
    cases = json.loads((root / f"cases-{group}.json").read_text())
    work = root / f"work-{group}"
    work.mkdir(exist_ok=True)
    results = (root / f"results-{group}.jsonl").open("a")
    raise_on_alarm()
    limits = {}
    for command in dict.fromkeys(command for command, _, _ in cases):
        # The first call on a sound copy imports and warms up what the command uses; the
        # bound is 5 s beyond what a second one takes (analyze draws its plots then).
        warm = run_case(command, root, work, None, None, limit=120)
        if warm["problems"] or warm["code"] != 0:
            raise SystemExit(f"the sound run fails: {warm}")
        limits[command] = TIME_LIMIT_S + run_case(command, root, work, None, None, 120)["seconds"]
    cap_address_space()
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for command, target, kind in cases:
        result = run_case(command, root, work, target, kind, limits[command])
        results.write(json.dumps(result) + "\n")
        results.flush()
    growth = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024
    results.write(json.dumps({"max_rss_growth_mb": growth, "limits_s": limits}) + "\n")
    results.close()


def argv_of(command: str, run: Path, out: Path) -> list[str]:
    return {
        "eval": ["eval", "--run", str(run), "--max-batches", "1"],
        "generate": ["generate", "--run", str(run), "--prompt", "Now", "--max-new-tokens", "4"],
        "analyze": ["analyze", "--run", str(run), "--out", str(out), "--samples", "2"],
        "export-hf": ["export-hf", "--run", str(run), "--out", str(out)],
        "train-resume": ["train", "--resume", str(run), "--max-steps", "5"],
    }[command]


def call(command: str, run: Path, out: Path) -> int:
    """The command's exit code; the library calls raise what the CLI turns into code 2."""
    from truthgpt.cli import main
    from truthgpt.nn.model import TruthGPTModel
    from truthgpt.training import load_core
    from truthgpt.training.errors import exit_code, one_line

    if command not in ("pretrained", "core"):
        return main(argv_of(command, run, out))
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            TruthGPTModel.from_pretrained(run) if command == "pretrained" else load_core(run)
    except BaseException as err:
        if exit_code(err) != 2:
            raise
        print(f"truthgpt {command}: error: {one_line(err)}", file=sys.stderr)
        return 2
    for warning in caught:  # as the CLI shows them
        print(f"truthgpt {command}: warning: {warning.message}", file=sys.stderr)
    return 0


def run_case(
    command: str,
    root: Path,
    work: Path,
    target: str | None,
    kind: str | None,
    limit: float = TIME_LIMIT_S,
) -> dict:
    """Damage a fresh copy of the run, run `command` on it, and say what went wrong."""
    run, out = work / "run", work / "out"
    remove(run, out)
    shutil.copytree(root / "pristine", run, symlinks=True)
    if target is not None and kind is not None:
        damage(run / target, kind, root / "other" / target)
    around = [root / "data", root / "pristine", root / "other", work, Path("/dev/zero")]
    before = {str(p): snapshot(p, skip=(run, out)) for p in around}
    run_before = snapshot(run)
    stdout, stderr = io.StringIO(), io.StringIO()
    problems: list[str] = []
    code = None
    began = time.perf_counter()
    signal.setitimer(signal.ITIMER_REAL, limit)
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            code = call(command, run, out)
    except CaseTimeout:
        problems.append(f"took over {limit} s")
    except BaseException as err:  # a traceback: a bug
        lines = traceback.format_exception(err)
        problems.append(f"raised {type(err).__name__}: {str(err)[:300]} | {lines[-2].strip()}")
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    elapsed = time.perf_counter() - began
    err = stderr.getvalue()
    newest = f"checkpoints/{STEPS[-1]}"
    harmless = kind == "other-run" and target is not None and same(root, target)
    if code == 0 and target is not None and target.startswith(newest) and not harmless:
        said = [x for x in (stdout.getvalue() + err).splitlines() if newest in x]
        if not any("skipped" in x or "moved aside" in x for x in said):
            problems.append(f"went on without saying that {newest} was passed over")
    lines = [line for line in err.splitlines() if line.strip()]
    # exit 1: a resume that started training and then could not write (a folder in place
    # of report.json), as the CLI promises for a run that started and failed
    if code not in (None, 0, 2) and not (code == 1 and command == "train-resume"):
        problems.append(f"exit code {code}")
    if "Traceback" in err:
        problems.append("a traceback on stderr")
    if code in (1, 2):
        line = lines[-1] if lines else ""
        if not line.startswith(f"truthgpt {command.split('-resume')[0]}: error: "):
            problems.append(f"the last line is not an error line: {line[:300]!r}")
        elif str(run) not in line or "/.tmp-" in line:
            problems.append(f"the error names no path of the run: {line[:300]}")
    others = [x for x in lines[:-1] if code in (1, 2)] + [x for x in lines if code == 0]
    odd = [x for x in others if ": warning: " not in x and command != "train-resume"]
    if odd:
        problems.append(f"stderr has lines that are not warnings: {odd[:2]}")
    for path in around:
        now = snapshot(path, skip=(run, out))
        if now != before[str(path)]:
            problems.append(f"{path} changed: {diff(before[str(path)], now)}")
    if command != "train-resume" and snapshot(run) != run_before:
        problems.append(f"the run changed: {diff(run_before, snapshot(run))}")
    if command == "train-resume" and code == 0:
        problems += resume_problems(run_before, snapshot(run))
    remove(run, out)
    return {
        "case": f"{command} {target} {kind}",
        "code": code,
        "seconds": round(elapsed, 3),
        "stderr": lines[-3:],
        "problems": problems,
    }


def same(root: Path, target: str) -> bool:
    """Whether the other run's entry holds the same bytes (the tokenizer does): a link to it
    is then no damage."""
    mine, other = root / "pristine" / target, root / "other" / target
    return mine.is_file() and other.is_file() and mine.read_bytes() == other.read_bytes()


def remove(*paths: Path) -> None:
    for path in paths:
        if os.path.lexists(path) and not os.path.islink(path) and path.is_dir():
            shutil.rmtree(path)
        elif os.path.lexists(path):
            path.unlink()


def resume_problems(before: dict, after: dict) -> list[str]:
    """What a resume changed that it should not have: entries outside the checkpoints folder
    other than the logs it appends to, and checkpoints it neither wrote nor set aside."""
    written = ("run.json", "metrics.jsonl", "report.json", ".lock", "training_curves.png", "tb/")
    written += ("checkpoints/latest", "checkpoints/best", "checkpoints/step-0000005")
    problems = []
    for path in sorted(set(before) | set(after)):
        if before.get(path) == after.get(path) or path.startswith(written):
            continue
        if path.startswith("checkpoints/damaged-") or path == "checkpoints/.":
            continue
        name = path.removeprefix("checkpoints/").split("/")[0]
        if path.startswith("checkpoints/step-") and (path not in after or path not in before):
            continue  # a checkpoint written, or an old one set aside or rotated out
        if f"checkpoints/damaged-{name}" in after:
            continue  # set aside (then trained again)
        problems.append(f"the resume changed {path}: {before.get(path)} -> {after.get(path)}")
    return problems[:3]


def damage(path: Path, kind: str, other: Path) -> None:
    """Replace `path` (a file, folder or pointer of the copy) by `kind`."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()
    if kind == "dev-zero":
        path.symlink_to("/dev/zero")
    elif kind == "loop":
        path.symlink_to(path.name)
    elif kind == "other-run":
        path.symlink_to(other)
    elif kind == "fifo":
        os.mkfifo(path)
    elif kind == "folder":
        path.mkdir()
    elif kind == "empty":
        path.touch()
    elif kind == "huge":
        with path.open("wb") as f:
            f.truncate(HUGE)
    else:
        raise ValueError(kind)


def snapshot(top: Path, skip: tuple[Path, ...] = ()) -> dict[str, Any]:
    """What every entry under `top` is (its type, a link's target, a small file's digest,
    a large one's size and time), without following links or opening anything else."""
    out: dict[str, Any] = {}
    paths = [top]
    while paths:
        path = paths.pop()
        try:
            info = os.lstat(path)
        except FileNotFoundError:
            continue
        key = str(path.relative_to(top))
        if stat.S_ISLNK(info.st_mode):
            out[key] = ("link", os.readlink(path))
        elif stat.S_ISDIR(info.st_mode):
            out[key] = ("folder",)
            paths += [path / name for name in os.listdir(path) if path / name not in skip]
        elif stat.S_ISREG(info.st_mode) and info.st_size <= 2**24:
            out[key] = ("file", info.st_size, hashlib.sha256(path.read_bytes()).hexdigest())
        elif stat.S_ISREG(info.st_mode):
            out[key] = ("file", info.st_size, info.st_mtime_ns)
        else:
            out[key] = (stat.S_IFMT(info.st_mode), info.st_rdev, info.st_mtime_ns)
    return out


def diff(before: dict, after: dict) -> str:
    changed = [k for k in sorted(set(before) | set(after)) if before.get(k) != after.get(k)]
    return "; ".join(f"{k}: {before.get(k)} -> {after.get(k)}" for k in changed[:3])


if __name__ == "__main__":
    if sys.argv[1] == "--child":
        child(sys.argv[2], Path(sys.argv[3]))
    else:
        full = "--full" in sys.argv
        args = [a for a in sys.argv[1:] if a != "--full"]
        folder = Path(args[0])
        folder.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        report = fuzz(folder, int(args[1]) if len(args) > 1 else SEED, full)
        failed = [c for c in report["cases"] if c["problems"]]
        for case in failed:
            print(f"{case['case']}: {'; '.join(case['problems'])}")
        print(
            f"{len(report['cases'])} cases, {len(failed)} failed, "
            f"{time.perf_counter() - started:.0f} s, peak RSS growth "
            f"{max(report['max_rss_growth_mb'].values(), default=0):.0f} MB"
        )
        raise SystemExit(1 if failed else 0)
