"""The registry of distance kinds: lookups, registration rules, and a user-registered kind end
to end (attention, training, KV-cache generation, save and load)."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch

import truthgpt
from test_attention import make
from truthgpt.config import ConfigError, TruthGPTConfig, TruthGPTOptimizationCoreConfig
from truthgpt.nn.attention import DistanceAttention, distance_attention, kinds, register_distance
from truthgpt.nn.model import TruthGPTModel
from truthgpt.training import TruthGPTOptimizationCore, load_core

VOCAB = 23


def logcosh(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Σ_d log cosh(q_d − k_d): a smooth L1, a kind truthgpt does not have."""
    return torch.log(torch.cosh(q[..., :, None, :] - k[..., None, :, :])).sum(-1)


@pytest.fixture
def user_kind():
    """'logcosh' (alias 'smooth_l1') registered for one test, removed afterwards."""
    kind = register_distance(
        "logcosh", logcosh, default_lambda=lambda D: 2.0 / math.sqrt(D), aliases=("smooth_l1",)
    )
    yield kind
    if "logcosh" in kinds.names():
        kinds.unregister("logcosh")


# --------------------------------------------------------------------------------------------
# the registry


def test_builtin_kinds_and_their_paths():
    assert kinds.builtin_names() == ("dot", "cosine", "l1", "l2", "sql2", "chebyshev", "lp")
    assert kinds.names() == kinds.builtin_names()
    assert kinds.names("sdpa") == ("dot", "cosine", "sql2")
    assert kinds.names("blocked") == ("l1", "l2", "chebyshev", "lp")
    assert kinds.names("plain") == ()
    assert {kinds.get(n).kernel.native_code for n in kinds.names("blocked")} == {0, 1, 2, 3}
    assert [n for n in kinds.names() if kinds.get(n).takes_p] == ["lp"]
    with pytest.raises(ValueError, match="fast_path must be one of"):
        kinds.names("fast")


def test_get_resolves_aliases_in_any_case_and_names_an_unknown_kind():
    for alias, name in [
        ("manhattan", "l1"),
        ("Euclidean", "l2"),
        ("squared_l2", "sql2"),
        ("SQ_L2", "sql2"),
        ("dot_product", "dot"),
        ("linf", "chebyshev"),
        ("L1", "l1"),
    ]:
        assert kinds.get(alias).name == name
    assert kinds.get(kinds.get("l2")) is kinds.get("l2")
    with pytest.raises(ValueError) as err:
        kinds.get("hamming")
    assert str(err.value) == (
        "unknown distance kind 'hamming'; registered: dot, cosine, l1, l2, sql2, chebyshev, lp"
    )


def test_builtin_kinds_cannot_be_replaced_or_removed():
    for name in ("l1", "L1"):
        with pytest.raises(ValueError, match="distance kind 'l1' is built in and cannot be"):
            register_distance(name, logcosh, default_lambda=1.0)
    with pytest.raises(ValueError, match="'manhattan' is an alias of the built-in 'l1' and"):
        register_distance("manhattan", logcosh, default_lambda=1.0)
    with pytest.raises(ValueError, match="'euclidean' is an alias of the built-in 'l2' and"):
        register_distance("mine", logcosh, default_lambda=1.0, aliases=("euclidean",))
    with pytest.raises(ValueError, match="is built in and cannot be removed"):
        kinds.unregister("l2")
    assert kinds.names() == kinds.builtin_names()
    assert kinds.get("l1").distance is not logcosh


def test_registration_rules(user_kind):
    assert kinds.names()[-1] == "logcosh"
    assert kinds.get("Smooth_L1") is user_kind
    assert user_kind.fast_path == "plain" and not user_kind.takes_p
    with pytest.raises(ValueError, match="already names the distance kind 'logcosh'"):
        register_distance("logcosh", logcosh, default_lambda=1.0)
    with pytest.raises(ValueError, match="already names the distance kind 'logcosh'"):
        register_distance("other", logcosh, default_lambda=1.0, aliases=["smooth_l1"])
    for bad in ("", "two words", "a,b", 3):
        with pytest.raises(ValueError, match="non-empty string without spaces or commas"):
            register_distance(bad, logcosh, default_lambda=1.0)
    for bad in (0.0, -1.0, math.inf, "1", True):
        with pytest.raises(ValueError, match="default_lambda must be"):
            register_distance("other", logcosh, default_lambda=bad)
    with pytest.raises(ValueError, match="fn must be callable"):
        register_distance("other", "not a function", default_lambda=1.0)
    assert "other" not in kinds.names()  # nothing half-registered
    kinds.unregister("smooth_l1")  # by alias
    assert kinds.names() == kinds.builtin_names()
    with pytest.raises(ValueError, match="unknown distance kind 'smooth_l1'"):
        kinds.get("smooth_l1")


def test_register_distance_is_a_top_level_name():
    assert truthgpt.register_distance is register_distance
    assert "register_distance" in truthgpt.__all__


def test_the_config_layer_does_not_import_torch():
    code = (
        "import sys\n"
        "from truthgpt.config import TruthGPTConfig\n"
        "TruthGPTConfig(vocab_size=5, distance_type='whatever')\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_the_trainer_rejects_an_unknown_kind_before_training():
    config = TruthGPTOptimizationCoreConfig(
        vocab_size=VOCAB, hidden_size=16, num_attention_heads=2, distance_type="hamming"
    )
    with pytest.raises(ConfigError) as err:
        TruthGPTOptimizationCore(config)
    message = str(err.value)
    assert message.startswith("distance_type: unknown distance kind 'hamming'; registered: dot")
    assert "\n" not in message


# --------------------------------------------------------------------------------------------
# a user-registered kind


def test_user_kind_attention_is_its_formula_with_gradients(user_kind):
    calls = []

    def counted(q, k):
        calls.append(q.shape)
        return logcosh(q, k)

    kinds.unregister("logcosh")
    register_distance("logcosh", counted, default_lambda=1.0)
    q, k, v = make(Tq=4, Tk=7, dtype=torch.float64, grad=True)
    scale = torch.tensor([0.4, 0.7, 1.1], dtype=torch.float64, requires_grad=True)
    out = distance_attention(q, k, v, "logcosh", scale)
    assert calls == [q.shape]  # the plain path, from the kind's own function

    # the naive formula: softmax(−λ·d + causal mask) @ v
    scores = -scale.view(1, -1, 1, 1) * logcosh(q, k)
    scores = scores.masked_fill(torch.ones(4, 7).triu(7 - 4 + 1).bool(), -math.inf)
    torch.testing.assert_close(out, torch.softmax(scores, -1) @ v)
    out_w, weights = distance_attention(q, k, v, "logcosh", scale, need_weights=True)
    torch.testing.assert_close(out_w, out)
    assert weights.shape == (2, 3, 4, 7)
    assert torch.autograd.gradcheck(
        lambda q, k, v, s: distance_attention(q, k, v, "logcosh", s), (q, k, v, scale)
    )
    # a masked row is zero, not NaN, like every other kind
    mask = torch.ones(2, 3, 4, 7, dtype=torch.bool)
    mask[0, 0, 1] = False
    masked = distance_attention(q, k, v, "logcosh", scale, attn_mask=mask)
    assert (masked[0, 0, 1] == 0).all() and torch.isfinite(masked).all()


def test_reference_table_has_no_row_for_a_user_kind(user_kind):
    """The reference-row test would fail for a kind registered without a row."""
    import test_attention

    with pytest.raises(AssertionError, match="no reference row for \\['logcosh'\\]"):
        test_attention.test_every_registered_kind_has_a_reference_row()


def tiny_config(kind: str) -> TruthGPTOptimizationCoreConfig:
    return TruthGPTOptimizationCoreConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=24,
        block_size=12,
        batch_size=4,
        warmup_steps=1,
        learning_rate=1e-2,
        device="cpu",
        seed=0,
        distance_type=kind,
    )


def counting_batch(step: int) -> dict[str, torch.Tensor]:
    """Each token is the previous one plus one: a language a tiny model learns in a few steps."""
    start = torch.randint(0, VOCAB, (4, 1), generator=torch.Generator().manual_seed(step))
    ids = (start + torch.arange(12)) % VOCAB
    return {"input_ids": ids, "labels": ids}


def test_user_kind_trains_generates_saves_and_loads(user_kind, tmp_path):
    core = TruthGPTOptimizationCore(tiny_config("Smooth_L1"))  # an alias, in another case
    model = core.raw_model
    assert model.config.distance_type == "logcosh"
    assert all(block.attn.distance_type == "logcosh" for block in model.blocks)
    lambda_0 = 2 / math.sqrt(16)  # the kind's default at head size 32 / 2
    torch.testing.assert_close(model.lambdas(), torch.full_like(model.lambdas(), lambda_0))

    core.setup_optimizer()
    losses = [core.train_step(counting_batch(i))["loss"] for i in range(12)]
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < 0.8 * losses[0], losses
    assert (model.lambdas() != lambda_0).any()  # λ is learned too

    model.eval()
    prompt = counting_batch(100)["input_ids"][:2, :5]
    cached = model.generate(prompt, 15, do_sample=False, use_cache=True)
    full = model.generate(prompt, 15, do_sample=False, use_cache=False)
    assert cached.shape == (2, 20)
    assert torch.equal(cached, full)
    with torch.no_grad():
        past = model(prompt, use_cache=True).past_key_values
        step = model(cached[:, 5:6], past_key_values=past).logits[:, -1]
        torch.testing.assert_close(step, model(cached[:, :6]).logits[:, -1], atol=1e-5, rtol=0)

    model.save_pretrained(tmp_path / "saved")
    core.save_checkpoint(tmp_path / "checkpoint")
    again = TruthGPTModel.from_pretrained(tmp_path / "saved")
    assert again.config == model.config
    with torch.no_grad():
        assert torch.equal(again(cached).logits, model(cached).logits)

    # A process that has not registered the kind cannot rebuild the model, and says why.
    kinds.unregister("logcosh")
    for load in (
        lambda: TruthGPTModel.from_pretrained(tmp_path / "saved"),
        lambda: load_core(tmp_path / "checkpoint"),
    ):
        with pytest.raises(ConfigError) as err:
            load()
        assert str(err.value).startswith("distance_type: unknown distance kind 'logcosh'")
        assert "register_distance" in str(err.value)


def test_user_kind_in_a_layer_takes_its_default_lambda(user_kind):
    layer = DistanceAttention(24, 3, "logcosh")
    torch.testing.assert_close(layer.lambda_, torch.full((3,), 2 / math.sqrt(8)))
    assert layer.p is None
    assert TruthGPTConfig(vocab_size=VOCAB, distance_type="logcosh").distance_type == "logcosh"
