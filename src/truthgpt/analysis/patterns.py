"""Attention patterns: what each head looks at, measured on real text.

`attention_statistics` is a pure function of a (B, H, T, T) weights tensor, so every number it
reports can be checked by hand. `analyze_attention` runs a model over evenly spaced windows of
validation text and accumulates the same statistics layer by layer, without keeping every
weight in memory.

Causal masking is taken into account everywhere: query i sees keys 0..i, i.e. n_i = i + 1
visible keys, and the weights on the masked (future) keys are never part of a statistic.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor

# What each per-head statistic means; written into analysis.json next to the numbers.
DEFINITIONS: dict[str, str] = {
    "lambda": "effective λ of the head (exp(log_lambda) clamped to the allowed range)",
    "entropy": "attention entropy in nats, −Σ_j w_ij·ln w_ij over visible keys, mean over rows",
    "entropy_normalized": (
        "entropy / ln(n_i) with n_i = i + 1 visible keys, mean over rows with n_i ≥ 2; "
        "1.0 is uniform over the visible keys, 0.0 is one-hot"
    ),
    "mean_weight": (
        "mean of the visible weights of a row (Σ_j w_ij / n_i), averaged over rows; for rows "
        "that sum to 1 this is the average of 1/n_i whatever the head does (a check, not a "
        "property of the head)"
    ),
    "top1_weight": "largest weight of a row, averaged over rows (the top-1 share)",
    "max_weight": "largest single weight anywhere (layer summary: max over heads)",
    "self_weight": "weight of a token on itself (the diagonal w_ii), mean over rows",
    "distance_mean": "attended distance Σ_j w_ij·(i − j) in tokens, mean over rows",
    "distance_std": "standard deviation over rows of that per-row attended distance",
    "distance_spread": (
        "per-row standard deviation of the distance i − j under the row's weights, "
        "mean over rows (how widely one query spreads its attention)"
    ),
    "row_sum_error": "max |Σ_j w_ij − 1| over rows (a check: should be ~1e-7)",
    "masked_weight": "max weight on a future (masked) key (a check: should be 0)",
}

# Statistics whose layer summary is a maximum over heads rather than a mean.
_MAX_KEYS = ("max_weight", "row_sum_error", "masked_weight")


# --------------------------------------------------------------------------------------------
# Statistics of a weights tensor


def _check_weights(weights: Tensor) -> None:
    if not isinstance(weights, Tensor) or weights.dim() != 4:
        shape = tuple(weights.shape) if isinstance(weights, Tensor) else type(weights).__name__
        raise ValueError(f"weights: expected a (batch, heads, T, T) tensor, got {shape}")
    if not weights.is_floating_point():
        raise ValueError(f"weights: expected floating-point weights, got dtype {weights.dtype}")
    if weights.shape[-1] != weights.shape[-2]:
        raise ValueError(
            "weights: expected square (T, T) rows of causal self-attention without a cache, got "
            f"{weights.shape[-2]} queries × {weights.shape[-1]} keys"
        )
    if weights.numel() == 0:
        raise ValueError("weights: empty tensor")
    if not bool(torch.isfinite(weights).all()) or bool((weights < 0).any()):
        raise ValueError("weights: every weight must be finite and ≥ 0")


def _row_sums(weights: Tensor) -> dict[str, Tensor]:
    """Per-head sums over rows (batch × query) of every per-row quantity, plus row counts.

    Sums (not means) so that batches of any size and length can be added up exactly.
    """
    _check_weights(weights)
    B, H, T, _ = weights.shape
    w = weights.detach().to(torch.float64)
    pos = torch.arange(T, device=w.device)
    visible = pos[None, :] <= pos[:, None]  # (T, T): key j visible to query i
    n = (pos + 1).to(torch.float64)  # visible keys per row
    gap = (pos[:, None] - pos[None, :]).clamp(min=0).to(torch.float64)  # i − j

    w_vis = w * visible
    entropy = -torch.xlogy(w_vis, w_vis).sum(-1)  # (B, H, T)
    dist = (w_vis * gap).sum(-1)
    dist_var = ((w_vis * gap**2).sum(-1) - dist**2).clamp(min=0)
    multi = n > 1  # rows whose entropy can be normalised

    def total(x: Tensor) -> Tensor:
        return x.sum(dim=(0, 2))  # over batch and rows → (H,)

    return {
        "rows": torch.full((H,), float(B * T), dtype=torch.float64, device=w.device),
        "rows_multi": torch.full(
            (H,), float(B * int(multi.sum())), dtype=torch.float64, device=w.device
        ),
        "entropy": total(entropy),
        "entropy_normalized": total(entropy[..., multi] / n[multi].log()),
        "mean_weight": total(w_vis.sum(-1) / n),
        "top1_weight": total(w_vis.amax(-1)),
        "self_weight": total(w.diagonal(dim1=-2, dim2=-1)),
        "distance_mean": total(dist),
        "distance_mean_sq": total(dist**2),
        "distance_spread": total(dist_var.sqrt()),
        # Maxima, merged with max rather than +.
        "max_weight": w_vis.amax(dim=(0, 2, 3)),
        "row_sum_error": (w.sum(-1) - 1).abs().amax(dim=(0, 2)),
        "masked_weight": (w * ~visible).amax(dim=(0, 2, 3)),
    }


def _merge(acc: dict[str, Tensor] | None, new: dict[str, Tensor]) -> dict[str, Tensor]:
    if acc is None:
        return new
    return {
        key: torch.maximum(acc[key], value) if key in _MAX_KEYS else acc[key] + value
        for key, value in new.items()
    }


def _finish(acc: dict[str, Tensor]) -> list[dict[str, float]]:
    """Row sums → one dict of means per head."""
    rows = acc["rows"]
    dist_mean = acc["distance_mean"] / rows
    dist_std = (acc["distance_mean_sq"] / rows - dist_mean**2).clamp(min=0).sqrt()
    multi = acc["rows_multi"]
    stats = {
        "entropy": acc["entropy"] / rows,
        # A sequence of one token has no row with two visible keys: nothing to normalise.
        "entropy_normalized": torch.where(
            multi > 0, acc["entropy_normalized"] / multi.clamp(min=1), torch.nan
        ),
        "mean_weight": acc["mean_weight"] / rows,
        "top1_weight": acc["top1_weight"] / rows,
        "max_weight": acc["max_weight"],
        "self_weight": acc["self_weight"] / rows,
        "distance_mean": dist_mean,
        "distance_std": dist_std,
        "distance_spread": acc["distance_spread"] / rows,
        "row_sum_error": acc["row_sum_error"],
        "masked_weight": acc["masked_weight"],
    }
    columns = {key: value.cpu().tolist() for key, value in stats.items()}
    num_heads = len(columns["entropy"])
    return [{key: float(columns[key][h]) for key in columns} for h in range(num_heads)]


def attention_statistics(weights: Tensor) -> list[dict[str, float]]:
    """Per-head statistics of causal self-attention weights (B, H, T, T); see `DEFINITIONS`.

    Every row (each batch element and query position) counts once; the normalised entropy
    leaves out row 0, whose single visible key makes ln(n) = 0.
    """
    return _finish(_row_sums(weights))


def summarize_heads(heads: list[dict[str, float]]) -> dict[str, float]:
    """One summary of several heads: the mean of each statistic (the max for maxima)."""
    if not heads:
        raise ValueError("heads: need at least one head to summarise")
    keys = [k for k in heads[0] if k != "head"]
    summary = {}
    for key in keys:
        values = [h[key] for h in heads if not math.isnan(h[key])]
        if not values:
            summary[key] = math.nan
        elif key in _MAX_KEYS:
            summary[key] = max(values)
        else:
            summary[key] = sum(values) / len(values)
    return summary


# --------------------------------------------------------------------------------------------
# Running a model over text


def _sample_windows(split: Any, num_samples: int, block_size: int) -> Tensor:
    """`num_samples` windows of `block_size` tokens, evenly spaced over the split (deterministic).

    A split with fewer distinct windows than asked gives each distinct window once.
    """
    tokens = split.tokens
    if len(tokens) < block_size:
        raise ValueError(
            f"data: the {getattr(split, 'name', 'given')} split has {len(tokens)} tokens, fewer "
            f"than block_size={block_size}; use a smaller block_size or more text"
        )
    last = len(tokens) - block_size
    starts = np.unique(np.linspace(0, last, num_samples).round().astype(np.int64))
    windows = np.asarray(tokens)[starts[:, None] + np.arange(block_size)]
    return torch.from_numpy(windows.astype(np.int64))


def _input_ids(batch: Any) -> Tensor:
    """The input ids of one batch: a dict with input_ids, an (x, y) pair, or a tensor."""
    if isinstance(batch, Mapping):
        if "input_ids" not in batch:
            raise ValueError("data: a dict batch needs an 'input_ids' tensor")
        mask = batch.get("attention_mask")
        if mask is not None and not bool((torch.as_tensor(mask) != 0).all()):
            raise ValueError(
                "data: padded batches (attention_mask with zeros) are not supported; attention "
                "statistics need rows of real tokens"
            )
        ids = batch["input_ids"]
    elif isinstance(batch, tuple | list) and len(batch) == 2:
        ids = batch[0]
    elif isinstance(batch, Tensor):
        ids = batch
    else:
        raise ValueError(
            "data: expected batches as dicts with 'input_ids', (x, y) tuples or tensors, got "
            f"{type(batch).__name__}"
        )
    if not isinstance(ids, Tensor) or ids.dim() != 2:
        raise ValueError("data: input_ids must be a (batch, length) tensor")
    return ids


def _collect_sequences(data: Any, num_samples: int, block_size: int) -> tuple[list[Tensor], str]:
    """Sequences to analyse as a list of (b, T) tensors, and a description of where from."""
    if hasattr(data, "val") and hasattr(data.val, "tokens"):  # prepared data: its val split
        return list(_sample_windows(data.val, num_samples, block_size).split(8)), "val split"
    if hasattr(data, "tokens"):  # one token split
        name = getattr(data, "name", "token")
        return list(_sample_windows(data, num_samples, block_size).split(8)), f"{name} split"
    if not isinstance(data, Iterable):
        raise ValueError(
            "data: expected prepared data, a token split or an iterable of batches, got "
            f"{type(data).__name__}"
        )
    chunks, taken = [], 0
    for batch in data:
        ids = _input_ids(batch)[: num_samples - taken]
        chunks.append(ids)
        taken += ids.shape[0]
        if taken >= num_samples:
            break
    if not chunks:
        raise ValueError("data: the iterable of batches is empty")
    return chunks, "given batches"


def check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: must be a positive integer, got {value!r}")


@torch.no_grad()
def layer_weights(model: Any, input_ids: Tensor) -> tuple[Tensor, ...]:
    """Attention weights of every layer, each (B, H, T, T), from one eval-mode forward pass."""
    was_training = model.training
    model.eval()
    try:
        output = model(input_ids.to(model.device), output_attentions=True)
    finally:
        model.train(was_training)
    return output.attentions


def token_labels(tokenizer: Any, token_ids: Iterable[int], max_chars: int = 6) -> list[str]:
    """Readable axis labels: each token decoded alone, newline as ↵, space as ␣, tab as ⇥."""
    labels = []
    for token in token_ids:
        text = tokenizer.decode([int(token)]) if tokenizer is not None else str(int(token))
        text = text.replace("\n", "↵").replace(" ", "␣").replace("\t", "⇥")
        labels.append(text if len(text) <= max_chars else text[: max_chars - 1] + "…")
    return labels


def token_pieces(tokenizer: Any, token_ids: Iterable[int]) -> list[str]:
    """Each token decoded alone and in full (spaces, newlines and all), for showing the text."""
    if tokenizer is None:
        return [str(int(token)) for token in token_ids]
    return [tokenizer.decode([int(token)]) for token in token_ids]


def analyze_attention(
    model: Any,
    data: Any,
    num_samples: int = 100,
    block_size: int | None = None,
    *,
    tokenizer: Any = None,
    sample_tokens: int = 48,
) -> dict[str, Any]:
    """Per-layer, per-head attention statistics of `model` on real text, as a JSON-able dict.

    Args:
        model: a `TruthGPTModel`.
        data: prepared data (its val split is used), a token split, or an iterable of batches
            (dicts with input_ids, (x, y) tuples or (B, T) tensors).
        num_samples: sequences to analyse; from a split they are windows of `block_size` tokens
            evenly spaced over the text, so the result is deterministic.
        block_size: window length; None takes the model's max_position_embeddings.
        tokenizer: decodes the sample passage; taken from prepared data when not given.
        sample_tokens: length of the sample passage kept for heat maps (`result["sample"]`:
            its ids, short axis labels, and "pieces", each token's full text).
    """
    check_positive_int("num_samples", num_samples)
    check_positive_int("sample_tokens", sample_tokens)
    config = model.config
    if block_size is None:
        block_size = config.max_position_embeddings
    check_positive_int("block_size", block_size)
    if block_size > config.max_position_embeddings:
        raise ValueError(
            f"block_size: {block_size} exceeds the model's max_position_embeddings="
            f"{config.max_position_embeddings}"
        )
    if tokenizer is None:
        tokenizer = getattr(data, "tokenizer", None)

    chunks, source = _collect_sequences(data, num_samples, block_size)
    accumulators: list[dict[str, Tensor] | None] = [None] * config.num_hidden_layers
    sequences = tokens = 0
    for ids in chunks:
        for layer, weights in enumerate(layer_weights(model, ids)):
            accumulators[layer] = _merge(accumulators[layer], _row_sums(weights))
        sequences += ids.shape[0]
        tokens += ids.numel()

    lambdas = model.lambdas().cpu().tolist()
    layers = []
    for layer, acc in enumerate(accumulators):
        assert acc is not None
        heads = [
            {"head": h, "lambda": lambdas[layer][h], **stats}
            for h, stats in enumerate(_finish(acc))
        ]
        layers.append({"layer": layer, "heads": heads, "mean": summarize_heads(heads)})

    sample_ids = chunks[0][0, :sample_tokens].tolist()
    return {
        "model": {
            "distance_type": config.distance_type,
            "num_layers": config.num_hidden_layers,
            "num_heads": config.num_attention_heads,
            "num_parameters": model.num_parameters(),
        },
        "source": source,
        "num_samples": sequences,
        "block_size": int(chunks[0].shape[1]),
        "tokens_analyzed": tokens,
        "definitions": DEFINITIONS,
        "layers": layers,
        "mean": summarize_heads([layer["mean"] for layer in layers]),
        "sample": {
            "token_ids": sample_ids,
            "tokens": token_labels(tokenizer, sample_ids),
            "pieces": token_pieces(tokenizer, sample_ids),
        },
    }
