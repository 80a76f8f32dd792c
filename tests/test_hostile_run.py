"""A run folder from a damaged or hostile file system: each case gets one line naming the
file and what it is, exit code 2 (or the run goes on from what is sound, saying so), and
never a hang, a traceback or memory without bound."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest

import test_cli_robust
from test_cli_robust import one_error_line, train
from truthgpt.cli import main
from truthgpt.io import CheckpointError
from truthgpt.io.files import CONFIG_LIMIT
from truthgpt.nn.model import TruthGPTModel

DEEP = 100_000
data_dir = test_cli_robust.data_dir  # the fixture: prepared text for tiny runs


@pytest.fixture(scope="module")
def run(tmp_path_factory, data_dir) -> Path:
    """A 4-step run with checkpoints at steps 2 and 4, as `truthgpt train` leaves it."""
    run = tmp_path_factory.mktemp("hostile") / "run"
    assert train(data_dir, run, "--max-steps", "4") == 0
    return run


@pytest.fixture
def copy(run, tmp_path) -> Path:
    shutil.copytree(run, tmp_path / "run")
    return tmp_path / "run"


def refused(argv: list[str], capsys, *words: str) -> str:
    assert main(argv) == 2
    line = one_error_line(capsys.readouterr().err)
    for word in words:
        assert word in line, line
    return line


def resign(folder: Path) -> None:
    manifest = json.loads((folder / "manifest.json").read_text())
    for name in manifest["files"]:
        data = (folder / name).read_bytes()
        manifest["files"][name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (folder / "manifest.json").write_text(json.dumps(manifest))


def test_a_pointer_linked_to_dev_zero_is_not_read_past_its_limit(copy, capsys) -> None:
    latest = copy / "checkpoints" / "latest"
    latest.unlink()
    latest.symlink_to("/dev/zero")
    assert main(["eval", "--run", str(copy)]) == 0  # the newest complete checkpoint instead
    assert json.loads(capsys.readouterr().out)["step"] == 4


def test_a_pointer_that_is_a_fifo_does_not_hang(copy, capsys) -> None:
    latest = copy / "checkpoints" / "latest"
    latest.unlink()
    os.mkfifo(latest)
    assert main(["eval", "--run", str(copy)]) == 0
    assert json.loads(capsys.readouterr().out)["step"] == 4


def test_run_json_nested_deeply_is_one_line(copy, capsys) -> None:
    (copy / "run.json").write_text("[" * DEEP + "]" * DEEP)
    refused(["train", "--resume", str(copy), "--max-steps", "6"], capsys, "run.json")
    (copy / "run.json").write_text('{"data": ' + "[" * 100 + "]" * 100 + "}")
    refused(["train", "--resume", str(copy), "--max-steps", "6"], capsys, "levels deep")


@pytest.mark.parametrize("suffix", [".toml", ".json"])
def test_a_config_file_nested_deeply_is_one_line(tmp_path, data_dir, capsys, suffix) -> None:
    config = tmp_path / f"deep{suffix}"
    body = "[" * DEEP + "]" * DEEP
    config.write_text(f"x = {body}\n" if suffix == ".toml" else body)
    argv = ["train", "--data", str(data_dir), "--out", str(tmp_path / "r"), "--config"]
    refused([*argv, str(config)], capsys, str(config))
    assert not (tmp_path / "r").exists()


def test_a_fifo_as_config_or_corpus_is_named_a_fifo(tmp_path, data_dir, capsys) -> None:
    fifo = tmp_path / "pipe.toml"
    os.mkfifo(fifo)
    argv = ["train", "--data", str(data_dir), "--out", str(tmp_path / "r"), "--config", str(fifo)]
    refused(argv, capsys, "FIFO")
    refused(["prepare", "--corpus", str(fifo), "--out", str(tmp_path / "d")], capsys, "FIFO")


def test_a_huge_config_json_is_refused_before_it_is_read(run, tmp_path) -> None:
    folder = tmp_path / "ckpt"
    shutil.copytree(run / "checkpoints" / "step-0000004", folder)
    config = folder / "config.json"
    text = config.read_text()
    with config.open("a") as f:  # 300 MB of spaces after the object: still valid JSON
        f.truncate(len(text) + 300 * 2**20)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"]["config.json"]["size"] = config.stat().st_size  # the hash is not checked
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=rf"config\.json: .* more than .*{CONFIG_LIMIT:,}"):
        TruthGPTModel.from_pretrained(folder)


def test_a_checkpoint_of_another_run_is_not_resumed(copy, data_dir, tmp_path, capsys) -> None:
    other = tmp_path / "other"
    assert train(data_dir, other, "--max-steps", "2", "--set", "hidden_size=64") == 0
    step = copy / "checkpoints" / "step-0000006"
    shutil.copytree(other / "checkpoints" / "step-0000002", step)
    (copy / "checkpoints" / "latest").write_text("step-0000006\n")
    line = refused(["train", "--resume", str(copy), "--max-steps", "8"], capsys, str(step))
    assert "hidden_size=64 (checkpoint) vs 32" in line
    assert not (copy / "checkpoints" / "step-0000008").exists()


def test_a_damaged_newest_checkpoint_is_named_then_set_aside_on_resume(copy, capsys) -> None:
    newest = copy / "checkpoints" / "step-0000004"
    (newest / "manifest.json").unlink()
    assert main(["eval", "--run", str(copy)]) == 0
    captured = capsys.readouterr()
    warning = [line for line in captured.err.splitlines() if "warning" in line]
    assert len(warning) == 1 and str(newest) in warning[0] and "using step-0000002" in warning[0]
    assert "no manifest.json" in warning[0]
    # Resuming goes on from step 2, past step 4, with the damaged folder kept under a new name.
    assert main(["train", "--resume", str(copy), "--max-steps", "6"]) == 0
    out = capsys.readouterr().out
    assert "moved aside to damaged-step-0000004" in out and "resuming from step-0000002" in out
    assert (copy / "checkpoints" / "damaged-step-0000004" / "model.safetensors").is_file()
    assert (copy / "checkpoints" / "step-0000004" / "manifest.json").is_file()  # trained again
    assert (copy / "checkpoints" / "latest").read_text().strip() == "step-0000006"


def test_duplicate_tensor_names_in_a_header_are_refused(run, tmp_path) -> None:
    folder = tmp_path / "ckpt"
    shutil.copytree(run / "checkpoints" / "step-0000004", folder)
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    length = int.from_bytes(data[:8], "little")
    header = data[8 : 8 + length].decode()
    name, entry = next((k, v) for k, v in json.loads(header).items() if k != "__metadata__")
    # The same name twice, the second entry first (a parser keeping the last sees no change).
    twice = "{" + f'"{name}": {json.dumps(entry)}, ' + header[1:]
    twice = twice.encode().ljust(len(twice.encode()) + (-len(twice.encode())) % 8)
    weights.write_bytes(len(twice).to_bytes(8, "little") + twice + data[8 + length :])
    resign(folder)
    with pytest.raises(CheckpointError, match=rf"'{name}' appears twice"):
        TruthGPTModel.from_pretrained(folder)


def rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_metrics_after_the_checkpoint_are_not_logged_twice_on_resume(
    tmp_path,
    data_dir,
    capsys,
) -> None:
    """A run stopped after logging steps past its last checkpoint (and tearing a line) logs
    those steps again when it resumes: metrics.jsonl ends with the same rows, in the same
    order, as an uninterrupted run's."""
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    assert train(data_dir, straight, "--max-steps", "8", "--checkpoint-every", "4") == 0
    shutil.copytree(straight, stopped)
    shutil.rmtree(stopped / "checkpoints" / "step-0000008")
    (stopped / "checkpoints" / "latest").write_text("step-0000004\n")
    with (stopped / "metrics.jsonl").open("a") as f:
        f.write('{"event": "train", "step": 9, "lo')  # torn by a crash mid-write
    assert main(["train", "--resume", str(stopped), "--max-steps", "8"]) == 0

    def key(row: dict) -> tuple:
        return row["event"], row["step"], row.get("loss")

    assert [key(r) for r in rows(stopped)] == [key(r) for r in rows(straight)]
    assert [r["step"] for r in rows(stopped) if r["event"] == "train"] == list(range(1, 9))


def test_a_full_disk_while_training_is_exit_1_naming_the_path(
    tmp_path,
    data_dir,
    capsys,
    monkeypatch,
) -> None:
    """The second checkpoint's write fails as a full disk fails a write() (ENOSPC, no file
    name): the run had started, so exit 1, one line naming the checkpoint; the first
    checkpoint stays loadable and the run resumes from it."""
    import errno

    from truthgpt.training import checkpoint

    run = tmp_path / "run"
    real, calls = checkpoint.write_model_files, []

    def full_disk(folder, *args, **kwargs):
        calls.append(folder)
        if len(calls) == 2:
            (folder / "model.safetensors").write_bytes(b"\0" * 100)  # a partial file
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(folder, *args, **kwargs)

    monkeypatch.setattr(checkpoint, "write_model_files", full_disk)
    assert train(data_dir, run, "--max-steps", "6") == 1
    line = one_error_line(capsys.readouterr().err)
    target = run / "checkpoints" / "step-0000004"
    assert f"{target}: No space left on device" in line, line
    assert "step-0000002 can be resumed" in line, line
    left = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert "step-0000002" in left and not [n for n in left if "0000004" in n], left
    monkeypatch.setattr(checkpoint, "write_model_files", real)
    assert main(["eval", "--run", str(run)]) == 0
    assert main(["train", "--resume", str(run), "--max-steps", "6"]) == 0


def test_a_lock_file_linked_elsewhere_is_refused_and_not_written(copy, tmp_path, capsys) -> None:
    """The lock file is truncated and written: through a link it would change another file."""
    outside = tmp_path / "outside.lock"
    outside.write_text("not ours\n")
    (copy / ".lock").unlink()
    (copy / ".lock").symlink_to(outside)
    refused(["train", "--resume", str(copy), "--max-steps", "6"], capsys, ".lock", "link")
    assert outside.read_text() == "not ours\n"


def test_a_checkpoints_folder_that_is_a_link_or_a_file_is_not_resumed(copy, tmp_path, capsys):
    """A run writes its checkpoints only inside its folder."""
    checkpoints = copy / "checkpoints"
    checkpoints.rename(tmp_path / "elsewhere")
    checkpoints.symlink_to(tmp_path / "elsewhere")
    refused(["train", "--resume", str(copy), "--max-steps", "6"], capsys, "checkpoints", "link")
    assert not (tmp_path / "elsewhere" / "step-0000006").exists()
    checkpoints.unlink()
    checkpoints.write_text("")
    refused(["train", "--resume", str(copy), "--max-steps", "6"], capsys, "is a file")
    assert checkpoints.read_text() == ""


def test_a_folder_in_place_of_report_json_fails_the_run_with_exit_1(copy, capsys) -> None:
    """The run trains, then cannot write its report: a run that started and failed (exit
    1), naming the file; the checkpoints it wrote stay."""
    (copy / "report.json").unlink()
    (copy / "report.json").mkdir()
    assert main(["train", "--resume", str(copy), "--max-steps", "6"]) == 1
    line = one_error_line(capsys.readouterr().err)
    assert str(copy / "report.json") in line and ".tmp-" not in line, line
    assert (copy / "checkpoints" / "latest").read_text().strip() == "step-0000006"
