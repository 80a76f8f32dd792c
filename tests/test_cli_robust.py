"""What a careless or concurrent user can do to a run, and what the CLI answers: one line,
exit code 2 (1 for a run that started and failed), nothing lost, no dead ends."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from test_cli_train import TINY
from truthgpt.cli import main

TRAIN_TINY = [*TINY, "--checkpoint-every", "2"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("robust")
    text = root / "text.txt"
    text.write_text("Now is the winter of our discontent\nMade glorious summer.\n" * 40)
    out = root / "data"
    assert main(["prepare", "--corpus", str(text), "--tokenizer", "char", "--out", str(out)]) == 0
    return out


def train(data_dir: Path, run: Path, *extra: str) -> int:
    return main(["train", "--data", str(data_dir), "--out", str(run), *TRAIN_TINY, *extra])


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err, err
    assert lines and lines[-1].startswith("truthgpt "), err
    return lines[-1]


def test_a_second_writer_is_refused_naming_the_process(tmp_path, data_dir, capsys) -> None:
    run = tmp_path / "run"
    assert train(data_dir, run, "--max-steps", "2") == 0
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from truthgpt.io.lock import RunLock; "
         f"RunLock({str(run)!r}).acquire(); print('locked', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        capsys.readouterr()
        assert main(["train", "--resume", str(run), "--max-steps", "4"]) == 2
        line = one_error_line(capsys.readouterr().err)
        assert f"process {holder.pid} is writing this run" in line
        state = json.loads(
            (run / "checkpoints" / "step-0000002" / "trainer_state.json").read_text()
        )
        assert state["step"] == 2  # nothing was written by the refused writer
    finally:
        holder.send_signal(signal.SIGKILL)  # the kernel releases its lock: never stale
        holder.wait()
    assert main(["train", "--resume", str(run), "--max-steps", "4"]) == 0


def test_out_that_is_a_file_is_one_line_and_kept(tmp_path, data_dir, capsys) -> None:
    (tmp_path / "file").write_text("mine")
    assert train(data_dir, tmp_path / "file", "--max-steps", "1") == 2
    assert "--out" in one_error_line(capsys.readouterr().err)
    assert (tmp_path / "file").read_text() == "mine"


def test_read_only_output_is_exit_2_without_traceback(tmp_path, monkeypatch, capsys) -> None:
    from truthgpt import cli

    def failing(args):
        raise OSError(errno.EROFS, "Read-only file system", str(tmp_path / "out"))

    parser = cli.build_parser()
    monkeypatch.setattr(cli, "build_parser", lambda: _with_func(parser, failing))
    assert cli.main(["eval", "--run", str(tmp_path)]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert line.endswith(f"{tmp_path / 'out'}: Read-only file system")


def _with_func(parser, func):
    original = parser.parse_args

    def parse_args(argv=None):
        args = original(argv)
        args.func = func
        return args

    parser.parse_args = parse_args
    return parser


def test_divergence_is_exit_1_and_one_line(tmp_path, data_dir, capsys, monkeypatch) -> None:
    from truthgpt.training import TrainingDiverged, TruthGPTOptimizationCore

    def diverge(self, batch):
        raise TrainingDiverged("2 consecutive steps had a non-finite loss or gradient")

    monkeypatch.setattr(TruthGPTOptimizationCore, "train_step", diverge)
    code = train(data_dir, tmp_path / "run", "--max-steps", "4")
    err = capsys.readouterr().err
    assert code == 1
    assert "consecutive steps had a non-finite loss" in one_error_line(err)


def test_a_refused_start_writes_nothing(tmp_path, data_dir, capsys) -> None:
    run = tmp_path / "run"
    assert train(data_dir, run, "--set", "block_size=100000") == 2
    assert "block_size" in one_error_line(capsys.readouterr().err)
    assert not run.exists()
    assert train(data_dir, run, "--max-steps", "1") == 0  # the folder is still usable


def test_a_run_killed_before_its_first_checkpoint_resumes_from_step_0(
    tmp_path, data_dir, capsys
) -> None:
    run = tmp_path / "run"
    assert train(data_dir, run, "--max-steps", "2") == 0
    for path in sorted((run / "checkpoints").iterdir(), reverse=True):  # as if killed early
        if path.is_dir():
            import shutil

            shutil.rmtree(path)
        else:
            path.unlink()
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--max-steps", "2"]) == 0
    out = capsys.readouterr().out
    assert "holds no checkpoint yet: starting it from step 0 with its recorded config" in out
    assert (run / "checkpoints" / "step-0000002").is_dir()


def test_resume_refuses_model_changes_and_reports_allowed_ones(tmp_path, data_dir, capsys) -> None:
    run = tmp_path / "run"
    assert train(data_dir, run, "--max-steps", "2") == 0
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--set", "hidden_size=256"]) == 2
    assert "hidden_size cannot change" in one_error_line(capsys.readouterr().err)
    assert main(["train", "--resume", str(run), "--distance", "l2"]) == 2
    assert "distance_type cannot change" in one_error_line(capsys.readouterr().err)
    assert main(["train", "--resume", str(run), "--max-steps", "3"]) == 0
    assert "changed: max_steps=3" in capsys.readouterr().out


def test_resume_recovers_pointers_and_says_when_there_is_nothing_to_do(
    tmp_path, data_dir, capsys
) -> None:
    run = tmp_path / "run"
    assert train(data_dir, run, "--max-steps", "4") == 0
    checkpoints = run / "checkpoints"
    best = (checkpoints / "best").read_text()
    (checkpoints / "best").unlink()  # killed while the pointer was replaced
    (checkpoints / ".tmp-best-0badc0de").write_text("step-00")
    capsys.readouterr()
    assert main(["train", "--resume", str(run)]) == 0
    out = capsys.readouterr().out
    assert "already at step 4 of max_steps=4: nothing to do" in out
    assert "nan" not in out
    assert (checkpoints / "best").read_text() == best
    assert not (checkpoints / ".tmp-best-0badc0de").exists()


def test_resume_with_data_of_another_tokenizer_is_refused_up_front(
    tmp_path, data_dir, capsys
) -> None:
    run = tmp_path / "run"
    assert train(data_dir, run, "--max-steps", "2") == 0
    text = tmp_path / "other.txt"
    text.write_text("completely different letters: xyzqj 0123456789 !?\n" * 40)
    other = tmp_path / "other"
    assert main(["prepare", "--corpus", str(text), "--tokenizer", "char", "--out", str(other)]) == 0
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--data", str(other), "--max-steps", "4"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "another tokenizer" in line and str(other) in line


def test_compare_refuses_a_non_empty_out(tmp_path, capsys) -> None:
    (tmp_path / "mine.txt").write_text("keep me")
    assert main(["compare", "--kinds", "dot", "--out", str(tmp_path), "--steps", "1"]) == 2
    assert "not empty" in one_error_line(capsys.readouterr().err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.txt"]


def test_generate_caps_max_new_tokens(tmp_path, data_dir, capsys) -> None:
    run = tmp_path / "run"
    assert train(data_dir, run, "--max-steps", "1") == 0
    capsys.readouterr()
    args = ["generate", "--run", str(run), "--prompt", "Now", "--max-new-tokens", "10000000"]
    assert main(args) == 2
    assert "--max-new-tokens: must be an integer in [0, 1,000,000]" in one_error_line(
        capsys.readouterr().err
    )


def test_debug_shows_the_traceback(tmp_path, capsys) -> None:
    assert main(["--debug", "eval", "--run", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and "missing" in err.splitlines()[-1]


def test_workers_die_with_their_parent() -> None:
    """die_with_parent: a child whose parent is killed -9 gets the signal too."""
    code = (
        "import os, subprocess, sys, time\n"
        "child = subprocess.Popen([sys.executable, '-c', 'from truthgpt.training.distributed "
        "import die_with_parent; import time; die_with_parent(); print(1, flush=True); "
        "time.sleep(60)'], stdout=subprocess.PIPE)\n"
        "child.stdout.readline(); print(child.pid, flush=True); time.sleep(60)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert parent.stdout is not None
    child_pid = int(parent.stdout.readline())
    parent.kill()
    parent.wait()
    for _ in range(100):
        try:
            os.kill(child_pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    else:
        os.kill(child_pid, signal.SIGKILL)
        pytest.fail("the child outlived its parent")
