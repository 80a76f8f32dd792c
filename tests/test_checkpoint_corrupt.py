"""Bad checkpoint files raise CheckpointError naming the file, and change nothing."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import safetensors.torch
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from truthgpt.config import TruthGPTOptimizationCoreConfig
from truthgpt.io import CheckpointError
from truthgpt.nn.model import TruthGPTModel
from truthgpt.training import load_core
from truthgpt.training.core import TruthGPTOptimizationCore

VOCAB, BLOCK, BATCH = 40, 8, 2
FILES = ["config.json", "model.safetensors", "optimizer.safetensors", "trainer_state.json"]


def make_core(**overrides) -> TruthGPTOptimizationCore:
    fields = dict(
        vocab_size=VOCAB,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=BLOCK,
        block_size=BLOCK,
        batch_size=BATCH,
        warmup_steps=1,
        max_steps=10,
        device="cpu",
        peak_flops=1e12,
    )
    return TruthGPTOptimizationCore(TruthGPTOptimizationCoreConfig(**(fields | overrides)))


def train(core: TruthGPTOptimizationCore, steps: int) -> TruthGPTOptimizationCore:
    g = torch.Generator().manual_seed(core.step)
    for _ in range(steps):
        core.train_step({"input_ids": torch.randint(0, VOCAB, (BATCH, BLOCK), generator=g)})
    return core


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A good checkpoint, copied by each test before it is damaged."""
    path = tmp_path_factory.mktemp("good") / "ckpt"
    return train(make_core(), 2).save_checkpoint(path)


@pytest.fixture
def ckpt(saved: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(saved, tmp_path / "ckpt"))


@pytest.fixture
def target() -> TruthGPTOptimizationCore:
    """A core with its own trained state, which a failed load must leave untouched."""
    return train(make_core(seed=7), 1)


def snapshot(core: TruthGPTOptimizationCore) -> dict:
    optimizer = core.optimizer.state_dict() if core.optimizer is not None else {"state": {}}
    return {
        "weights": {k: v.clone() for k, v in core.model.state_dict().items()},
        "optimizer": {
            (i, k): v.clone() for i, s in optimizer["state"].items() for k, v in s.items()
        },
        "counters": (core.step, core.tokens_seen, core.best_val_loss, core.state.bad_steps_total),
        "rng": torch.get_rng_state(),
    }


def assert_unchanged(core: TruthGPTOptimizationCore, before: dict) -> None:
    after = snapshot(core)
    assert after["counters"] == before["counters"]
    assert torch.equal(after["rng"], before["rng"])
    for key in ("weights", "optimizer"):
        assert after[key].keys() == before[key].keys()
        for name, tensor in before[key].items():
            assert torch.equal(after[key][name], tensor), (key, name)


def resign(folder: Path) -> None:
    """Rewrite the manifest to match the files, so the checks behind it are reached."""
    manifest = json.loads((folder / "manifest.json").read_text())
    for name in list(manifest["files"]):
        if (folder / name).exists():
            data = (folder / name).read_bytes()
            manifest["files"][name] = {
                "size": len(data),
                "sha256": hashlib.sha256(data).hexdigest(),
            }
    (folder / "manifest.json").write_text(json.dumps(manifest))


def expect_error(core: TruthGPTOptimizationCore, folder: Path, pattern: str) -> str:
    before = snapshot(core)
    with pytest.raises(CheckpointError, match=pattern) as info:
        core.load_checkpoint(folder)
    assert_unchanged(core, before)
    return str(info.value)


# ------------------------------------------------------------------- caught by the manifest


def truncate(p: Path) -> None:
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def flip_middle(p: Path) -> None:
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0x01
    p.write_bytes(bytes(data))


def random_bytes(p: Path) -> None:
    p.write_bytes(torch.randint(0, 256, (p.stat().st_size,), dtype=torch.uint8).numpy().tobytes())


def delete(p: Path) -> None:
    p.unlink()


DAMAGE: dict[str, tuple[Callable[[Path], None], str]] = {
    "truncate": (truncate, "were saved; the file was truncated"),
    "flip": (flip_middle, "contents differ from what was saved"),
    "random": (random_bytes, "contents differ from what was saved"),
    "delete": (delete, "missing"),
}


@pytest.mark.parametrize("name", FILES)
@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_file_is_caught(ckpt: Path, target, name: str, damage: str) -> None:
    action, pattern = DAMAGE[damage]
    action(ckpt / name)
    message = expect_error(target, ckpt, pattern)
    assert name in message


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_weights_fail_load_pretrained(ckpt: Path, damage: str) -> None:
    DAMAGE[damage][0](ckpt / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"model\.safetensors"):
        TruthGPTModel.from_pretrained(ckpt)


@pytest.mark.parametrize(
    ("content", "pattern"),
    [
        (b"{not json", r"manifest\.json: not valid JSON"),
        (b"[1, 2]", r"manifest\.json: expected a JSON object, got list"),
        (b'{"format": "something-else", "format_version": 1, "files": {}}', "not a truthgpt"),
        (b'{"format": "truthgpt-checkpoint", "format_version": 999, "files": {}}', "newer"),
        (b'{"format": "truthgpt-checkpoint", "format_version": 1, "files": []}', "'files'"),
        (
            b'{"format": "truthgpt-checkpoint", "format_version": 1, '
            b'"files": {"model.safetensors": {"size": 1, "sha256": "xyz"}}}',
            "malformed",
        ),
        (
            b'{"format": "truthgpt-checkpoint", "format_version": 1, '
            b'"files": {"../../etc/passwd": {"size": 1, "sha256": "' + b"0" * 64 + b'"}}}',
            "malformed",
        ),
        (b'{"format": "truthgpt-checkpoint", "format_version": 1, "files": {}}', "not listed"),
    ],
)
def test_corrupt_manifest(ckpt: Path, target, content: bytes, pattern: str) -> None:
    (ckpt / "manifest.json").write_bytes(content)
    assert "manifest.json" in expect_error(target, ckpt, pattern) or pattern == "not listed"


def test_missing_manifest(ckpt: Path, target) -> None:
    (ckpt / "manifest.json").unlink()
    expect_error(target, ckpt, r"manifest\.json: missing")


def test_flipped_manifest_byte_is_caught(ckpt: Path, target) -> None:
    manifest = (ckpt / "manifest.json").read_text()
    digest = json.loads(manifest)["files"]["model.safetensors"]["sha256"]
    flipped = digest[:10] + ("0" if digest[10] != "0" else "1") + digest[11:]
    (ckpt / "manifest.json").write_text(manifest.replace(digest, flipped))
    expect_error(target, ckpt, r"model\.safetensors: contents differ")


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    name=st.sampled_from([*FILES, "manifest.json"]),
    where=st.integers(0, 2**31),
    bit=st.integers(0, 7),
)
def test_any_single_bit_flip_is_caught(saved: Path, tmp_path: Path, name, where, bit) -> None:
    folder = tmp_path / "flip"
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(saved, folder)
    data = bytearray((folder / name).read_bytes())
    data[where % len(data)] ^= 1 << bit
    (folder / name).write_bytes(bytes(data))
    core = make_core(seed=3)
    before = snapshot(core)
    try:
        core.load_checkpoint(folder)
    except CheckpointError:
        assert_unchanged(core, before)
    else:
        # Only JSON whitespace or formatting in the manifest can change harmlessly.
        assert name == "manifest.json" and json.loads(data) == json.loads(
            (saved / "manifest.json").read_text()
        )


# ------------------------------------------------------------------- checks behind the manifest


def save_weights(ckpt: Path, tensors: dict[str, torch.Tensor]) -> None:
    safetensors.torch.save_file(tensors, ckpt / "model.safetensors")
    resign(ckpt)


def good_weights(ckpt: Path) -> dict[str, torch.Tensor]:
    return safetensors.torch.load_file(ckpt / "model.safetensors")


def test_weights_of_another_shape(ckpt: Path, target, tmp_path: Path) -> None:
    other = make_core(hidden_size=32).save_checkpoint(tmp_path / "other")
    shutil.copy(other / "model.safetensors", ckpt / "model.safetensors")
    resign(ckpt)
    message = expect_error(target, ckpt, r"model\.safetensors: tensors do not fit")
    assert "shape mismatch" in message and "wte.weight (40, 32) vs (40, 16)" in message
    with pytest.raises(CheckpointError, match="shape mismatch"):
        TruthGPTModel.from_pretrained(ckpt)


def test_weights_of_another_dtype(ckpt: Path, target) -> None:
    save_weights(ckpt, {k: v.double() for k, v in good_weights(ckpt).items()})
    message = expect_error(target, ckpt, "dtype mismatch")
    assert "torch.float64 vs torch.float32" in message


def test_missing_and_unexpected_tensors_are_listed(ckpt: Path, target) -> None:
    tensors = good_weights(ckpt)
    del tensors["ln_f.weight"]
    tensors["extra.weight"] = torch.zeros(2)
    save_weights(ckpt, tensors)
    message = expect_error(target, ckpt, r"missing \(1\): ln_f\.weight")
    assert "unexpected (1): extra.weight" in message


def test_foreign_safetensors(ckpt: Path, target) -> None:
    save_weights(ckpt, {"encoder.layer.0.weight": torch.zeros(3, 3)})
    message = expect_error(target, ckpt, "unexpected")
    assert "missing (17): blocks.0.attn.c_attn.bias" in message and "… and 5 more" in message


@pytest.mark.parametrize("damage", ["truncate", "random"])
def test_unreadable_safetensors(ckpt: Path, target, damage: str) -> None:
    DAMAGE[damage][0](ckpt / "model.safetensors")
    resign(ckpt)
    expect_error(target, ckpt, r"model\.safetensors: not a readable safetensors file")


def edit_json(path: Path, edit: Callable[[dict], object]) -> None:
    data = json.loads(path.read_text())
    result = edit(data)
    path.write_text(json.dumps(data if result is None else result))
    resign(path.parent)


def test_config_of_a_different_size(ckpt: Path, target) -> None:
    edit_json(ckpt / "config.json", lambda c: c["model"].update(hidden_size=32))
    expect_error(target, ckpt, r"config\.json: a different model: hidden_size=32")
    # Loading the model alone finds the weights disagree with the config.
    with pytest.raises(CheckpointError, match=r"model\.safetensors: .*shape mismatch"):
        TruthGPTModel.from_pretrained(ckpt)


@pytest.mark.parametrize(
    ("edit", "pattern"),
    [
        (lambda c: c.update(format_version=999), "format_version 999 is newer"),
        (lambda c: [c], "expected a JSON object, got list"),
        (lambda c: c["model"].update(num_attention_heads=3), "invalid model config"),
        (lambda c: c["model"].update(hiden_size=3), "unknown field"),
        (lambda c: c.update(model=[1]), "invalid model config"),
        (lambda c: c.update(format="other"), "not a truthgpt checkpoint file"),
    ],
)
def test_bad_config(ckpt: Path, target, edit, pattern: str) -> None:
    edit_json(ckpt / "config.json", edit)
    assert "config.json" in expect_error(target, ckpt, pattern)
    with pytest.raises(CheckpointError, match=pattern):
        TruthGPTModel.from_pretrained(ckpt)
    with pytest.raises(CheckpointError, match=pattern):
        load_core(ckpt)


def test_config_not_json(ckpt: Path, target) -> None:
    (ckpt / "config.json").write_text("model: {hidden_size: 16}")
    resign(ckpt)
    expect_error(target, ckpt, r"config\.json: not valid JSON")


def test_bad_training_config_in_load_core(ckpt: Path) -> None:
    edit_json(ckpt / "config.json", lambda c: c["train"].update(batch_size=0))
    with pytest.raises(CheckpointError, match="invalid training config: batch_size"):
        load_core(ckpt)


@pytest.mark.parametrize(
    ("edit", "pattern"),
    [
        (lambda s: s.update(step="three"), "'step' must be an integer"),
        (lambda s: s.update(tokens_seen=-5), "'tokens_seen' must be an integer"),
        (lambda s: s.update(best_val_loss="low"), "'best_val_loss' must be a number in"),
        (lambda s: s.update(extra=[1]), "'extra' must be an object"),
        (lambda s: s["rng"].update(torch_cpu="AAAA"), "invalid random state"),
        (lambda s: s["rng"].update(python=[3, [1, 2], None]), "invalid random state"),
        (lambda s: s.__delitem__("rng"), "invalid random state"),
        (lambda s: [s], "expected a JSON object, got list"),
    ],
)
def test_bad_trainer_state(ckpt: Path, target, edit, pattern: str) -> None:
    edit_json(ckpt / "trainer_state.json", edit)
    assert "trainer_state.json" in expect_error(target, ckpt, pattern)


def optimizer_parts(ckpt: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safetensors.safe_open(ckpt / "optimizer.safetensors", "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()  # noqa: SIM118


def save_optimizer(ckpt: Path, tensors, metadata) -> None:
    safetensors.torch.save_file(tensors, ckpt / "optimizer.safetensors", metadata)
    resign(ckpt)


def test_optimizer_tensor_of_wrong_shape(ckpt: Path, target) -> None:
    tensors, metadata = optimizer_parts(ckpt)
    tensors["state.0.exp_avg"] = torch.zeros(3, 3)
    save_optimizer(ckpt, tensors, metadata)
    message = expect_error(target, ckpt, r"optimizer\.safetensors: .*shape mismatch")
    assert "state.0.exp_avg (3, 3)" in message


def test_optimizer_state_incomplete(ckpt: Path, target) -> None:
    tensors, metadata = optimizer_parts(ckpt)
    del tensors["state.1.exp_avg_sq"]
    save_optimizer(ckpt, tensors, metadata)
    expect_error(target, ckpt, r"parameter 1: state lacks \['exp_avg_sq'\]")


def test_optimizer_metadata_missing(ckpt: Path, target) -> None:
    tensors, _ = optimizer_parts(ckpt)
    save_optimizer(ckpt, tensors, {"format": "pt"})
    expect_error(target, ckpt, r"optimizer\.safetensors: optimizer metadata is missing")


def test_optimizer_groups_do_not_match(ckpt: Path, target) -> None:
    tensors, metadata = optimizer_parts(ckpt)
    meta = json.loads(metadata["truthgpt.optimizer"])
    meta["param_groups"] = meta["param_groups"][:1]
    save_optimizer(ckpt, tensors, {**metadata, "truthgpt.optimizer": json.dumps(meta)})
    expect_error(target, ckpt, "param_groups do not match")


def test_optimizer_tensor_for_unknown_parameter(ckpt: Path, target) -> None:
    tensors, metadata = optimizer_parts(ckpt)
    tensors["state.999.exp_avg"] = torch.zeros(1)
    save_optimizer(ckpt, tensors, metadata)
    expect_error(target, ckpt, "unexpected tensor 'state.999.exp_avg'")


def test_fresh_core_keeps_no_optimizer_after_failed_load(ckpt: Path) -> None:
    truncate(ckpt / "optimizer.safetensors")
    core = make_core()
    with pytest.raises(CheckpointError, match=r"optimizer\.safetensors"):
        core.load_checkpoint(ckpt)
    assert core.optimizer is None and core.step == 0


def test_bad_tokenizer_file(tmp_path: Path) -> None:
    from truthgpt.data import build_tokenizer

    tokenizer = build_tokenizer("char", "abcdefghij klmnopqrstuvwxyz,.\n")
    core = TruthGPTOptimizationCore(
        make_core().config.replace(vocab_size=tokenizer.vocab_size), tokenizer=tokenizer
    )
    path = core.save_checkpoint(tmp_path / "ckpt")
    assert load_core(path).tokenizer.encode("abc") == tokenizer.encode("abc")
    flipped = Path(shutil.copytree(path, tmp_path / "flipped"))
    flip_middle(flipped / "tokenizer.json")
    with pytest.raises(CheckpointError, match=r"tokenizer\.json: contents differ"):
        load_core(flipped)
    edit_json(path / "tokenizer.json", lambda t: t.update(format="something-else"))
    with pytest.raises(CheckpointError, match=r"tokenizer\.json.*not a truthgpt tokenizer"):
        load_core(path)
    (path / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match=r"tokenizer\.json: missing"):
        load_core(path)


@pytest.mark.parametrize(("key", "value"), [("lr", "fast"), ("betas", [0.9]), ("eps", None)])
def test_optimizer_hyper_parameter_of_wrong_type(ckpt: Path, target, key: str, value) -> None:
    tensors, metadata = optimizer_parts(ckpt)
    meta = json.loads(metadata["truthgpt.optimizer"])
    meta["param_groups"][0][key] = value
    save_optimizer(ckpt, tensors, {**metadata, "truthgpt.optimizer": json.dumps(meta)})
    expect_error(target, ckpt, rf"param_groups\[0\]: '{key}' must be")
