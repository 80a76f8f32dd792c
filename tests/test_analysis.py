"""Attention statistics against hand computations, on real model weights, and their plots."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from truthgpt.analysis import (
    analyze_attention,
    attention_statistics,
    layer_weights,
    summarize_heads,
    token_labels,
)
from truthgpt.analysis.patterns import _merge, _row_sums, _sample_windows
from truthgpt.config import TruthGPTConfig
from truthgpt.data import CharTokenizer, TokenSplit
from truthgpt.nn.attention import kinds
from truthgpt.nn.model import TruthGPTModel
from truthgpt.workflows.plots import plot_attended_distance, plot_attention_heatmaps
from truthgpt.workflows.report import format_table

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def causal_mask(T: int) -> torch.Tensor:
    i = torch.arange(T)
    return i[None, :] <= i[:, None]


def uniform_causal(T: int, heads: int = 1) -> torch.Tensor:
    vis = causal_mask(T).double()
    return (vis / vis.sum(-1, keepdim=True)).expand(1, heads, T, T).clone()


def random_causal(B: int, H: int, T: int, seed: int, sharpness: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(B, H, T, T, generator=g, dtype=torch.float64) * sharpness
    return scores.masked_fill(~causal_mask(T), -math.inf).softmax(-1)


def tiny_model(kind: str = "l1", layers: int = 2, heads: int = 2, seed: int = 0) -> TruthGPTModel:
    torch.manual_seed(seed)
    config = TruthGPTConfig(
        vocab_size=30,
        hidden_size=12 * heads,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=24,
        distance_type=kind,
    )
    return TruthGPTModel(config)


def token_split(n: int = 400, seed: int = 0) -> TokenSplit:
    tokens = np.random.default_rng(seed).integers(0, 30, size=n).astype(np.uint16)
    return TokenSplit("val", tokens, num_chars=n)


# ------------------------------------------------------------------ hand computations


def test_uniform_causal_weights() -> None:
    T = 7
    (s,) = attention_statistics(uniform_causal(T))
    n = np.arange(1, T + 1)
    assert s["entropy_normalized"] == pytest.approx(1.0, abs=1e-12)
    assert s["entropy"] == pytest.approx(np.log(n).mean(), abs=1e-12)
    assert s["mean_weight"] == pytest.approx((1 / n).mean(), abs=1e-12)
    assert s["top1_weight"] == pytest.approx((1 / n).mean(), abs=1e-12)
    assert s["self_weight"] == pytest.approx((1 / n).mean(), abs=1e-12)
    assert s["max_weight"] == pytest.approx(1.0)  # row 0 has one visible key
    # Row i spreads evenly over distances 0..i: mean i/2, std sqrt(((i+1)^2 - 1) / 12).
    i = np.arange(T)
    assert s["distance_mean"] == pytest.approx((i / 2).mean(), abs=1e-12)
    assert s["distance_std"] == pytest.approx((i / 2).std(), abs=1e-12)
    assert s["distance_spread"] == pytest.approx(np.sqrt(((i + 1) ** 2 - 1) / 12).mean(), abs=1e-12)
    assert s["row_sum_error"] < 1e-12 and s["masked_weight"] == 0.0


def test_one_hot_diagonal() -> None:
    (s,) = attention_statistics(torch.eye(6)[None, None])
    assert s["entropy"] == 0.0 and s["entropy_normalized"] == 0.0
    assert s["self_weight"] == 1.0 and s["top1_weight"] == 1.0
    assert s["distance_mean"] == 0.0 and s["distance_std"] == 0.0 and s["distance_spread"] == 0.0


def test_one_hot_on_first_token() -> None:
    T = 9
    w = torch.zeros(2, 1, T, T)
    w[..., 0] = 1.0
    (s,) = attention_statistics(w)
    i = np.arange(T)
    assert s["distance_mean"] == pytest.approx(i.mean())
    assert s["distance_std"] == pytest.approx(i.std())
    assert s["distance_spread"] == pytest.approx(0.0, abs=1e-6)
    assert s["self_weight"] == pytest.approx(1 / T)  # only row 0 attends to itself
    assert s["entropy"] == 0.0 and s["top1_weight"] == 1.0


def test_small_example_by_hand() -> None:
    w = torch.tensor([[1.0, 0, 0], [0.25, 0.75, 0], [0.5, 0.25, 0.25]])[None, None]
    (s,) = attention_statistics(w)
    h1 = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    h2 = -(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25))
    assert s["entropy"] == pytest.approx((0 + h1 + h2) / 3)
    assert s["entropy_normalized"] == pytest.approx((h1 / math.log(2) + h2 / math.log(3)) / 2)
    assert s["top1_weight"] == pytest.approx((1 + 0.75 + 0.5) / 3)
    assert s["self_weight"] == pytest.approx((1 + 0.75 + 0.25) / 3)
    d1, d2 = 0.25 * 1, 0.25 * 1 + 0.5 * 2  # Σ w·(i−j)
    assert s["distance_mean"] == pytest.approx((0 + d1 + d2) / 3)
    var1 = 0.25 * 1 - d1**2
    var2 = 0.25 * 1 + 0.5 * 4 - d2**2
    assert s["distance_spread"] == pytest.approx((0 + math.sqrt(var1) + math.sqrt(var2)) / 3)
    assert s["mean_weight"] == pytest.approx((1 + 1 / 2 + 1 / 3) / 3)


def test_heads_are_kept_apart() -> None:
    w = torch.cat([uniform_causal(5), torch.eye(5)[None, None].double()], dim=1)
    uniform, diagonal = attention_statistics(w)
    assert uniform["entropy_normalized"] == pytest.approx(1.0)
    assert diagonal["entropy_normalized"] == 0.0 and diagonal["self_weight"] == 1.0


def test_mass_on_masked_keys_is_reported() -> None:
    w = uniform_causal(4)
    w[0, 0, 1, 3] = 0.5  # a future key: a broken mask
    (s,) = attention_statistics(w)
    assert s["masked_weight"] == 0.5 and s["row_sum_error"] == pytest.approx(0.5)


@pytest.mark.parametrize(
    "bad",
    [
        torch.zeros(2, 3, 4),  # 3-D
        torch.zeros(1, 1, 3, 4),  # not square
        torch.zeros(1, 1, 0, 0),  # empty
        torch.full((1, 1, 2, 2), -0.1),  # negative
        torch.full((1, 1, 2, 2), math.nan),  # NaN
        torch.ones(1, 1, 2, 2, dtype=torch.int64),  # not floating point
    ],
)
def test_bad_weights_raise(bad: torch.Tensor) -> None:
    with pytest.raises(ValueError, match="weights"):
        attention_statistics(bad)


@settings(max_examples=25, deadline=None)
@given(
    T=st.integers(1, 12),
    sharpness=st.floats(0.0, 30.0),
    seed=st.integers(0, 10_000),
    split=st.integers(1, 3),
)
def test_bounds_and_batch_merging(T: int, sharpness: float, seed: int, split: int) -> None:
    w = random_causal(4, 2, T, seed, sharpness)
    stats = attention_statistics(w)
    for s in stats:
        if T > 1:
            assert s["entropy_normalized"] <= 1 + 1e-9
        assert 0 <= s["entropy"] <= math.log(T) + 1e-9
        assert 1 / T - 1e-12 <= s["top1_weight"] <= 1 + 1e-12
        assert 0 <= s["distance_mean"] <= T - 1
    # Accumulating row sums over parts of the batch gives the statistics of the whole.
    acc = None
    for part in (w[:split], w[split:]):
        acc = _merge(acc, _row_sums(part))
    from truthgpt.analysis.patterns import _finish

    for merged, whole in zip(_finish(acc), stats, strict=True):
        for key, value in whole.items():
            if math.isnan(value):
                assert math.isnan(merged[key])
            else:
                assert merged[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key


def test_single_token_rows_have_no_normalised_entropy() -> None:
    (s,) = attention_statistics(torch.ones(3, 1, 1, 1))
    assert math.isnan(s["entropy_normalized"]) and s["entropy"] == 0.0


def test_summarize_heads_means_and_maxima() -> None:
    heads = [
        {"head": 0, "entropy": 1.0, "max_weight": 0.2},
        {"head": 1, "entropy": 3.0, "max_weight": 0.9},
    ]
    assert summarize_heads(heads) == {"entropy": 2.0, "max_weight": 0.9}
    with pytest.raises(ValueError, match="heads"):
        summarize_heads([])


# ------------------------------------------------------------------ real model weights


@pytest.mark.parametrize("kind", kinds.names())
def test_real_weights_are_causal_distributions(kind: str) -> None:
    model = tiny_model(kind)
    ids = torch.randint(0, 30, (3, 20), generator=torch.Generator().manual_seed(1))
    for w in layer_weights(model, ids):
        assert w.shape == (3, 2, 20, 20)
        torch.testing.assert_close(w.sum(-1), torch.ones(3, 2, 20), atol=1e-5, rtol=0)
        assert float(w.masked_select(~causal_mask(20)).abs().max()) == 0.0
        wd = w.double()
        entropy = -torch.xlogy(wd, wd).sum(-1)
        assert bool((entropy[..., 1:] <= torch.arange(2, 21).double().log() + 1e-6).all())
        for s in attention_statistics(w):
            assert s["entropy_normalized"] <= 1 + 1e-6
            assert s["row_sum_error"] < 1e-5 and s["masked_weight"] == 0.0


def test_layer_weights_restores_training_mode() -> None:
    model = tiny_model()
    model.train()
    layer_weights(model, torch.zeros(1, 4, dtype=torch.long))
    assert model.training


def test_analyze_attention_on_a_split() -> None:
    model = tiny_model(layers=3, heads=2)
    split = token_split()
    result = analyze_attention(model, split, num_samples=10, block_size=16, sample_tokens=12)
    json.dumps(result)  # JSON-able
    assert result["num_samples"] == 10 and result["block_size"] == 16
    assert result["tokens_analyzed"] == 160
    assert len(result["layers"]) == 3
    lambdas = model.lambdas()
    for layer in result["layers"]:
        heads = layer["heads"]
        assert [h["head"] for h in heads] == [0, 1]
        for h in heads:
            assert h["lambda"] == pytest.approx(float(lambdas[layer["layer"], h["head"]]))
            assert h["entropy_normalized"] <= 1 + 1e-6
        # Per-layer averages are the means of the heads (maxima for max_weight).
        for key in ("entropy", "entropy_normalized", "top1_weight", "distance_mean", "lambda"):
            assert layer["mean"][key] == pytest.approx(sum(h[key] for h in heads) / 2)
        assert layer["mean"]["max_weight"] == max(h["max_weight"] for h in heads)
    assert result["mean"]["entropy"] == pytest.approx(
        sum(layer["mean"]["entropy"] for layer in result["layers"]) / 3
    )
    assert len(result["sample"]["token_ids"]) == 12 == len(result["sample"]["tokens"])
    assert result["sample"]["token_ids"] == split.tokens[:12].tolist()  # first window starts at 0
    # Deterministic, and the same windows given as batches give the same numbers.
    again = analyze_attention(model, split, num_samples=10, block_size=16, sample_tokens=12)
    assert again == result
    windows = _sample_windows(split, 10, 16)
    batches = [(windows[:4], windows[:4]), {"input_ids": windows[4:]}]
    from_batches = analyze_attention(model, batches, num_samples=10, sample_tokens=12)
    for a, b in zip(from_batches["layers"], result["layers"], strict=True):
        for ha, hb in zip(a["heads"], b["heads"], strict=True):
            for key in hb:
                assert ha[key] == pytest.approx(hb[key], rel=1e-6, abs=1e-9), key


def test_windows_are_evenly_spaced_and_cover_the_split() -> None:
    split = token_split(100)
    windows = _sample_windows(split, 5, 20)
    expected = np.linspace(0, 80, 5).round().astype(int)
    for w, start in zip(windows, expected, strict=True):
        assert w.tolist() == split.tokens[start : start + 20].tolist()
    # More samples than distinct windows: each distinct window once.
    assert len(_sample_windows(token_split(25), 50, 20)) == 6


def test_analyze_attention_bad_input() -> None:
    model = tiny_model()
    with pytest.raises(ValueError, match="block_size"):
        analyze_attention(model, token_split(), block_size=100)  # > max_position_embeddings
    with pytest.raises(ValueError, match="num_samples"):
        analyze_attention(model, token_split(), num_samples=0, block_size=8)
    with pytest.raises(ValueError, match="fewer than block_size"):
        analyze_attention(model, token_split(5), block_size=8)
    with pytest.raises(ValueError, match="padded"):
        analyze_attention(
            model,
            [
                {
                    "input_ids": torch.zeros(1, 4, dtype=torch.long),
                    "attention_mask": torch.tensor([[1, 1, 0, 0]]),
                }
            ],
        )
    with pytest.raises(ValueError, match="empty"):
        analyze_attention(model, [])
    with pytest.raises(ValueError, match="data"):
        analyze_attention(model, 42)


def test_token_labels_escape_whitespace() -> None:
    tok = CharTokenizer("ab \n\t")
    labels = token_labels(tok, tok.encode("a \nb\t"))
    assert labels == ["a", "␣", "↵", "b", "⇥"]
    assert token_labels(None, [3, 7]) == ["3", "7"]


# ------------------------------------------------------------------ table and plots


def test_table_has_a_row_per_head_and_layer_means() -> None:
    model = tiny_model(layers=2, heads=3)
    result = analyze_attention(model, token_split(), num_samples=3, block_size=8)
    lines = format_table(result).splitlines()
    body = [line.split() for line in lines[2 : 2 + 2 * (3 + 1)]]
    assert lines[0].split() == ["layer", "head", "λ", *lines[0].split()[3:]]
    assert lines[2 + 2 * (3 + 1)].startswith("entropy in nats")  # the legend follows
    assert [row[1] for row in body[:4]] == ["0", "1", "2", "mean"]
    first = result["layers"][0]["heads"][0]
    assert body[0][3] == f"{first['entropy']:.3f}"


def test_plots_are_valid_pngs(tmp_path) -> None:
    import matplotlib.image

    model = tiny_model(layers=2, heads=3)
    result = analyze_attention(model, token_split(), num_samples=3, block_size=16, sample_tokens=10)
    ids = torch.tensor([result["sample"]["token_ids"]])
    weights = [w[0] for w in layer_weights(model, ids)]
    paths = plot_attention_heatmaps(
        weights, result["sample"]["tokens"], tmp_path, lambdas=model.lambdas().tolist()
    )
    paths.append(plot_attended_distance(result, tmp_path / "distance.png"))
    assert [p.name for p in paths] == [
        "attention_layer0.png",
        "attention_layer1.png",
        "distance.png",
    ]
    for path in paths:
        assert path.read_bytes()[:8] == PNG_SIGNATURE
        image = matplotlib.image.imread(path)
        assert image.shape[0] > 100 and image.shape[1] > 100
    with pytest.raises(ValueError, match="weights"):
        plot_attention_heatmaps(weights, ["a", "b"], tmp_path)
