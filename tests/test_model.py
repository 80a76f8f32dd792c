"""The model and its config: validation, JSON, forward outputs, loss, masks, init, parameters."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from truthgpt.config import (
    ConfigError,
    TrainConfig,
    TruthGPTConfig,
    TruthGPTOptimizationCoreConfig,
)
from truthgpt.nn.attention import default_lambda, kinds
from truthgpt.nn.model import TruthGPTModel

V, C, L, H, P = 23, 32, 2, 4, 16


def config(**overrides) -> TruthGPTConfig:
    fields = dict(
        vocab_size=V,
        hidden_size=C,
        num_hidden_layers=L,
        num_attention_heads=H,
        max_position_embeddings=P,
    )
    return TruthGPTConfig(**(fields | overrides))


def model(**overrides) -> TruthGPTModel:
    torch.manual_seed(0)
    return TruthGPTModel(config(**overrides)).eval()


def ids(batch: int = 2, length: int = 10, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, V, (batch, length), generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------------------------
# config


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"num_attention_heads": 5}, "num_attention_heads"),  # 5 does not divide 32
        ({"hidden_size": -32}, "hidden_size"),
        ({"hidden_size": 0}, "hidden_size"),
        ({"vocab_size": -1}, "vocab_size"),
        ({"num_hidden_layers": 0}, "num_hidden_layers"),
        ({"num_attention_heads": -4}, "num_attention_heads"),
        ({"intermediate_size": -5}, "intermediate_size"),
        ({"max_position_embeddings": 0}, "max_position_embeddings"),
        ({"vocab_size": 2.5}, "vocab_size"),
        ({"distance_type": ""}, "distance_type"),
        ({"distance_type": 3}, "distance_type"),
        ({"hidden_dropout_prob": 1.0}, "hidden_dropout_prob"),
        ({"hidden_dropout_prob": -0.1}, "hidden_dropout_prob"),
        ({"attention_probs_dropout_prob": 1.5}, "attention_probs_dropout_prob"),
        ({"lambda_param": 0.0}, "lambda_param"),
        ({"p_norm": -2.0, "distance_type": "lp"}, "p_norm"),
        ({"layer_norm_eps": 0.0}, "layer_norm_eps"),
        ({"tie_word_embeddings": "yes"}, "tie_word_embeddings"),
    ],
)
def test_config_errors_name_the_field(overrides: dict, field: str) -> None:
    with pytest.raises(ConfigError, match=rf"^{field}: "):
        config(**overrides)


def test_unknown_kind_fails_when_the_model_is_built_naming_it() -> None:
    """The config (below torch) only checks the name; the model resolves it in the registry."""
    cfg = config(distance_type="hamming")
    with pytest.raises(ConfigError, match=r"^distance_type: unknown distance kind 'hamming'"):
        TruthGPTModel(cfg)


def test_config_error_says_what_is_valid() -> None:
    with pytest.raises(ConfigError) as err:
        TruthGPTModel(config(distance_type="hamming"))
    assert all(kind in str(err.value) for kind in kinds.names())
    with pytest.raises(ConfigError, match="must divide hidden_size"):
        config(num_attention_heads=5)
    assert isinstance(err.value, ValueError)


def test_config_defaults_and_aliases() -> None:
    cfg = config(distance_type="Manhattan")
    assert cfg.distance_type == "manhattan"  # lower-cased; the model resolves the alias
    assert TruthGPTModel(cfg).config.distance_type == "l1"
    assert TruthGPTModel(cfg).config == config(distance_type="l1")
    assert cfg.distance_type == "manhattan"  # the caller's config is not changed
    assert cfg.intermediate_size == 4 * C
    assert cfg.head_dim == C // H
    assert config(distance_type="lp").p_norm == 3.0


def test_model_config_json_round_trip(tmp_path: Path) -> None:
    cfg = config(distance_type="lp", p_norm=1.5, lambda_param=0.7, tie_word_embeddings=False)
    again = TruthGPTConfig.from_json(cfg.to_json())
    assert again == cfg
    cfg.save(tmp_path / "config.json")
    assert TruthGPTConfig.load(tmp_path / "config.json") == cfg


def test_flat_config_json_round_trip_and_parts() -> None:
    flat = TruthGPTOptimizationCoreConfig(
        vocab_size=V, hidden_size=C, num_attention_heads=H, distance_type="cosine", max_steps=77
    )
    again = TruthGPTOptimizationCoreConfig.from_json(flat.to_json())
    assert again == flat
    assert again.model_config == TruthGPTConfig(
        vocab_size=V, hidden_size=C, num_attention_heads=H, distance_type="cosine"
    )
    assert again.train_config == TrainConfig(max_steps=77)
    assert TruthGPTOptimizationCoreConfig.from_parts(again.model_config, again.train_config) == flat


@pytest.mark.parametrize("cls", [TruthGPTConfig, TruthGPTOptimizationCoreConfig])
def test_unknown_keys_are_rejected(cls: type, tmp_path: Path) -> None:
    data = config().to_dict() | {"hiden_size": 64}
    with pytest.raises(ConfigError, match=r"unknown field.*hiden_size"):
        cls.from_dict(data)
    (tmp_path / "bad.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"bad\.json: not valid JSON"):
        cls.load(tmp_path / "bad.json")


def test_flat_config_validates_training_fields_too() -> None:
    with pytest.raises(ConfigError, match=r"^learning_rate: "):
        TruthGPTOptimizationCoreConfig(vocab_size=V, learning_rate=-1.0)
    with pytest.raises(ConfigError, match=r"^num_attention_heads: "):
        TruthGPTOptimizationCoreConfig(vocab_size=V, hidden_size=30, num_attention_heads=4)


# --------------------------------------------------------------------------------------------
# forward


def test_forward_output_fields() -> None:
    m = model()
    x = ids(2, 10)
    out = m(x)
    assert out.logits.shape == (2, 10, V)
    assert out.loss is None and out.attentions is None and out.past_key_values is None

    out = m(x, labels=x, output_attentions=True, use_cache=True)
    assert out.loss is not None and out.loss.dim() == 0
    assert len(out.attentions) == L
    for weights in out.attentions:
        assert weights.shape == (2, H, 10, 10)
        torch.testing.assert_close(weights.sum(-1), torch.ones(2, H, 10))
        assert (weights.triu(1) == 0).all()  # causal
    assert len(out.past_key_values) == L
    for k, v in out.past_key_values:
        assert k.shape == v.shape == (2, H, 10, C // H)


@pytest.mark.parametrize("kind", kinds.names())
def test_loss_is_shifted_cross_entropy_ignoring_minus_100(kind: str) -> None:
    m = model(distance_type=kind)
    x = ids(3, 12)
    labels = x.clone()
    labels[0, 3] = -100
    labels[2, 5:9] = -100
    out = m(x, labels=labels)

    total, count = 0.0, 0
    for b in range(3):
        for t in range(11):  # position t predicts label t + 1
            target = int(labels[b, t + 1])
            if target != -100:
                total -= float(F.log_softmax(out.logits[b, t].double(), -1)[target])
                count += 1
    assert count == 3 * 11 - 1 - 4
    assert math.isclose(float(out.loss), total / count, rel_tol=1e-5)


def test_labels_shape_must_match() -> None:
    with pytest.raises(ValueError, match="labels: expected shape"):
        model()(ids(2, 10), labels=ids(2, 9))


@pytest.mark.parametrize(
    ("x", "message"),
    [
        (torch.tensor([[0, 1, V]]), f"token id {V} is outside the vocabulary \\[0, {V}\\)"),
        (torch.tensor([[-1, 1]]), "token id -1 is outside the vocabulary"),
        (torch.zeros(1, P + 1, dtype=torch.long), f"exceeds max_position_embeddings={P}"),
        (torch.zeros(5, dtype=torch.long), "expected a \\(batch, length\\) tensor"),
        (torch.zeros(1, 3), "expected integer token ids"),
        (torch.zeros(1, 0, dtype=torch.long), "empty input"),
    ],
)
def test_bad_input_ids_are_clear_errors(x: torch.Tensor, message: str) -> None:
    with pytest.raises(ValueError, match=f"input_ids: .*{message}"):
        model()(x)


def test_cache_that_overflows_the_window_is_an_error() -> None:
    m = model()
    past = m(ids(1, P), use_cache=True).past_key_values
    with pytest.raises(ValueError, match=rf"past {P} \+ new 1\) exceeds max_position_embeddings"):
        m(ids(1, 1), past_key_values=past)


@pytest.mark.parametrize("kind", kinds.names())
def test_padded_keys_get_no_weight(kind: str) -> None:
    """Left padding: no query puts weight on a padded key, and the pad's content is invisible."""
    m = model(distance_type=kind)
    x = ids(2, 8)
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[0, :3] = 0  # row 0 has 3 padding tokens
    out = m(x, attention_mask=mask, output_attentions=True)
    for weights in out.attentions:
        assert (weights[0, :, :, :3] == 0).all()
        assert (weights[1] > 0).sum() > 0
        torch.testing.assert_close(weights[0, :, 3:].sum(-1), torch.ones(H, 5))

    other = x.clone()
    other[0, :3] = (x[0, :3] + 1) % V  # different pad tokens
    out2 = m(other, attention_mask=mask)
    torch.testing.assert_close(out2.logits[0, 3:], out.logits[0, 3:], atol=1e-6, rtol=0)
    # The fast path (no weights asked) agrees with the materialising one.
    torch.testing.assert_close(m(x, attention_mask=mask).logits[:, 3:], out.logits[:, 3:])


def test_attention_mask_shape_is_checked() -> None:
    with pytest.raises(ValueError, match=r"attention_mask: expected shape \(2, 8\)"):
        model()(ids(2, 8), attention_mask=torch.ones(2, 7))


# --------------------------------------------------------------------------------------------
# parameters


def test_tied_embeddings_are_one_tensor() -> None:
    m = model()
    assert m.lm_head.weight is m.wte.weight
    # A gradient step on the shared weight moves both uses.
    before = m.lm_head.weight.detach().clone()
    m.train()
    x = ids(2, 8)
    m(x, labels=x).loss.backward()
    with torch.no_grad():
        m.wte.weight -= 0.1 * m.wte.weight.grad
    assert not torch.equal(m.lm_head.weight, before)
    assert torch.equal(m.lm_head.weight, m.wte.weight)

    untied = model(tie_word_embeddings=False)
    assert untied.lm_head.weight is not untied.wte.weight


def test_gpt2_init_std() -> None:
    torch.manual_seed(0)
    layers = 4
    m = TruthGPTModel(config(hidden_size=128, num_hidden_layers=layers, vocab_size=500))
    residual = 0.02 / math.sqrt(2 * layers)
    for name, param in m.named_parameters():
        if name.endswith("c_proj.weight"):
            assert param.std().item() == pytest.approx(residual, rel=0.1), name
        elif name.endswith(("c_attn.weight", "c_fc.weight")) or name in (
            "wte.weight",
            "wpe.weight",
        ):
            assert param.std().item() == pytest.approx(0.02, rel=0.1), name
        elif name.endswith("bias"):
            assert (param == 0).all(), name
        elif ".ln_" in name or name.startswith("ln_f"):
            assert (param == 1).all(), name
    # λ keeps the attention module's own init, not N(0, 0.02).
    expected = default_lambda("l1", 128 // H)
    torch.testing.assert_close(m.lambdas(), torch.full((layers, H), expected))


def expected_count(tied: bool) -> int:
    per_layer = (
        2 * C  # ln_1
        + 3 * C * C
        + 3 * C  # c_attn
        + C * C
        + C  # attention c_proj
        + H  # log λ
        + 2 * C  # ln_2
        + 4 * C * C
        + 4 * C  # c_fc
        + 4 * C * C
        + C  # mlp c_proj
    )
    embeddings = V * C + P * C
    return embeddings + L * per_layer + 2 * C + (0 if tied else V * C)


def test_num_parameters_counts_tied_weights_once() -> None:
    tied, untied = model(), model(tie_word_embeddings=False)
    assert tied.num_parameters() == expected_count(tied=True)
    assert untied.num_parameters() == expected_count(tied=False)
    assert untied.num_parameters() - tied.num_parameters() == V * C
    assert tied.num_parameters(exclude_embeddings=True) == expected_count(True) - V * C - P * C


def test_flops_per_token_counts_the_lm_head_once_and_not_positions() -> None:
    """By hand for V=23, C=32, L=2, H=4: per layer the matmuls are qkv (C·3C), the output
    projection (C·C) and the MLP (C·4C + 4C·C) = 12C² weights, plus biases, LayerNorms and
    λ (3C + C + 4C + C + 4C + 4 + 4C); the LM head is the tied embedding (V·C, counted once);
    final LayerNorm 2C; the position embedding P·C is only looked up."""
    per_layer = 12 * C * C + (3 * C + C + 4 * C + C) + 4 * C + H
    n = L * per_layer + V * C + 2 * C
    T = 16
    assert model().flops_per_token(T) == 6 * n + 12 * L * C * T
    untied = model(tie_word_embeddings=False)
    assert untied.flops_per_token(T) == 6 * (n + V * C) + 12 * L * C * T


def test_optimizer_groups_no_decay_for_lambda_norms_biases() -> None:
    m = model()
    decay, no_decay = m.optimizer_groups(weight_decay=0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in m.named_parameters()}
    decay_names = {names[id(p)] for p in decay["params"]}
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    assert decay_names.isdisjoint(no_decay_names)
    assert decay_names | no_decay_names == set(names.values())
    for name in no_decay_names:
        assert name.endswith(("log_lambda", "bias")) or ".ln_" in name or name.startswith("ln_f")
    for name in decay_names:
        assert name.endswith("weight") and ".ln_" not in name and not name.startswith("ln_f")
    assert {f"blocks.{i}.attn.log_lambda" for i in range(L)} <= no_decay_names
    assert {"wte.weight", "wpe.weight", "blocks.0.attn.c_attn.weight"} <= decay_names

    frozen = model(use_learnable_lambda=False)
    grouped = [p for g in frozen.optimizer_groups(0.1) for p in g["params"]]
    assert all(p.requires_grad for p in grouped)
    assert not any(p is frozen.blocks[0].attn.log_lambda for p in grouped)
