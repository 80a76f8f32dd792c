"""Every command that writes a folder touches only folders it can prove it wrote.

Each command is pointed, with the flag that lets it replace its own earlier output, at: a
folder of the user's holding a file, its own input, a link to a folder of the user's, a file,
and a read-only folder. Each is refused with one line and exit code 2, and nothing there
changes: not a byte, not the link, not the permissions.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from pathlib import Path

import pytest

from truthgpt.cli import main
from truthgpt.data import load_prepared, prepare_data
from truthgpt.io.folders import MARKER_FILE, read_marker, write_marker
from truthgpt.training import TruthGPTOptimizationCore, build_config, train

TEXT = "".join(f"Line {i}: to be, or not to be, that is the question.\n" for i in range(200))


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A corpus file, data prepared from it, and a 2-step run trained on that data."""
    root = tmp_path_factory.mktemp("inputs")
    (root / "texts").mkdir()
    corpus = root / "texts" / "play.txt"
    corpus.write_text(TEXT, encoding="utf-8")
    prepare_data([str(corpus)], "char", root / "data")
    data = load_prepared(root / "data")
    config = build_config(
        vocab_size=data.vocab_size,
        overrides=dict(
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            block_size=8,
            batch_size=2,
            max_steps=2,
            warmup_steps=1,
            eval_interval=2,
            eval_batches=1,
            device="cpu",
        ),
    )
    run = root / "run"
    run.mkdir()
    (run / "run.json").write_text(json.dumps({"data": str(root / "data"), "preset": None}))
    train(TruthGPTOptimizationCore(config, tokenizer=data.tokenizer), data, run)
    return {"corpus": corpus, "texts": corpus.parent, "data": root / "data", "run": run}


def command(name: str, out: Path, inputs: dict[str, Path]) -> list[str]:
    """`name`'s command line writing to `out`, with the flag that allows replacing."""
    run, data = str(inputs["run"]), str(inputs["data"])
    return {
        "demo": ["demo", "--minutes", "0.5"],
        "prepare": ["prepare", "--corpus", str(inputs["corpus"]), "--force"],
        "train": ["train", "--data", data, "--max-steps", "1"],
        "compare": ["compare", "--kinds", "l1", "--steps", "1", "--seeds", "1", "--data", data],
        "analyze": ["analyze", "--run", run, "--samples", "1", "--force"],
        "tune-lambda": ["tune-lambda", "--run", run, "--epochs", "1"],
        "export-hf": ["export-hf", "--run", run, "--overwrite"],
    }[name] + ["--out", str(out)]


# The input each command must never write over (demo reads only the built-in corpus).
OWN_INPUT = {
    "prepare": "texts",
    "train": "data",
    "compare": "data",
    "analyze": "run",
    "tune-lambda": "run",
    "export-hf": "run",
}
COMMANDS = ("demo", "prepare", "train", "compare", "analyze", "tune-lambda", "export-hf")


def snapshot(path: Path) -> object:
    """Everything about `path` a command could change: type, link target, mode, contents."""
    if path.is_symlink():
        return ("link", os.readlink(path), snapshot(path.resolve()))
    info = path.stat()
    if path.is_dir():
        children = {p.name: snapshot(p) for p in sorted(path.iterdir())}
        return ("dir", stat.S_IMODE(info.st_mode), children)
    return ("file", stat.S_IMODE(info.st_mode), hashlib.sha256(path.read_bytes()).hexdigest())


def expect_refused(argv: list[str], watched: list[Path], capsys, *words: str) -> str:
    before = [snapshot(p) for p in watched]
    listing = sorted(p.name for p in watched[0].parent.iterdir())
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    for word in words:
        assert word in err, err
    assert [snapshot(p) for p in watched] == before
    assert sorted(p.name for p in watched[0].parent.iterdir()) == listing  # no .tmp- left
    return err


def user_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "user_notes.txt").write_text("do not lose me")
    return folder


@pytest.mark.parametrize("name", COMMANDS)
def test_an_unrelated_folder_is_never_replaced(name, inputs, tmp_path, capsys) -> None:
    if name == "export-hf":
        pytest.importorskip("transformers")
    folder = user_folder(tmp_path)
    expect_refused(command(name, folder, inputs), [folder], capsys, str(folder))


@pytest.mark.parametrize("name", sorted(OWN_INPUT))
def test_its_own_input_is_never_the_output(name, inputs, capsys) -> None:
    if name == "export-hf":
        pytest.importorskip("transformers")
    own = inputs[OWN_INPUT[name]]
    watched = [inputs["texts"], inputs["data"], inputs["run"]]
    expect_refused(command(name, own, inputs), watched, capsys, "input")


@pytest.mark.parametrize("name", COMMANDS)
def test_a_link_is_refused_naming_it(name, inputs, tmp_path, capsys) -> None:
    if name == "export-hf":
        pytest.importorskip("transformers")
    folder = tmp_path / "empty"
    folder.mkdir()  # even an empty folder: never written through a link
    link = tmp_path / "link"
    link.symlink_to(folder, target_is_directory=True)
    err = expect_refused(command(name, link, inputs), [link, folder], capsys, "symbolic link")
    assert str(link) in err


@pytest.mark.parametrize("name", COMMANDS)
def test_a_file_is_refused(name, inputs, tmp_path, capsys) -> None:
    if name == "export-hf":
        pytest.importorskip("transformers")
    file = tmp_path / "notes.txt"
    file.write_text("mine")
    expect_refused(command(name, file, inputs), [file], capsys, "not a folder")


@pytest.mark.parametrize("name", COMMANDS)
def test_a_read_only_folder_is_refused(name, inputs, tmp_path, capsys) -> None:
    if name == "export-hf":
        pytest.importorskip("transformers")
    folder = tmp_path / "locked"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        expect_refused(command(name, folder, inputs), [folder], capsys, "read-only")
    finally:
        folder.chmod(0o755)


def test_an_earlier_output_with_a_file_added_is_not_replaced(inputs, tmp_path, capsys) -> None:
    """A marker alone is not enough: a file the user added makes the folder theirs too."""
    out = tmp_path / "data"
    assert main(command("prepare", out, inputs)) == 0
    assert read_marker(out) == ("prepared data", frozenset(FILES))
    (out / "user_notes.txt").write_text("mine")
    expect_refused(command("prepare", out, inputs), [out], capsys, "'user_notes.txt'")


def test_another_kind_of_truthgpt_folder_is_not_replaced(inputs, tmp_path, capsys) -> None:
    out = tmp_path / "analysis"
    assert main(command("analyze", out, inputs)) == 0
    expect_refused(command("prepare", out, inputs), [out], capsys, "is an analysis folder")


def test_prepared_data_of_earlier_releases_is_still_replaceable(inputs, tmp_path) -> None:
    """Folders written before markers existed: recognised by holding only prepare's files
    and a meta.json of the prepared-data format."""
    out = tmp_path / "data"
    assert main(command("prepare", out, inputs)) == 0
    (out / MARKER_FILE).unlink()
    assert main(command("prepare", out, inputs)) == 0
    assert read_marker(out) is not None


def test_a_demo_report_with_a_file_added_is_refused(tmp_path, capsys) -> None:
    out = tmp_path / "report"
    out.mkdir()
    (out / "report.md").write_text("an earlier report")
    write_marker(out, "demo report")
    (out / "user_notes.txt").write_text("mine")
    expect_refused(["demo", "--minutes", "0.5", "--out", str(out)], [out], capsys, "user_notes")


FILES = {"meta.json", "tokenizer.json", "train.bin", "val.bin"}
