"""Distance attention inside Hugging Face `transformers` models (Llama, Qwen2/3, Mistral,
GPT-2, GPT-NeoX, and any causal LM whose attention goes through `AttentionInterface`).

    from transformers import AutoModelForCausalLM, LlamaConfig
    from truthgpt.hf import use_distance_attention
    model = use_distance_attention(AutoModelForCausalLM.from_config(LlamaConfig(...)), "l1")

`use_distance_attention` gives every attention module a per-head parameter `distance_lambda`
and switches the model to `attn_implementation="truthgpt_<kind>"`, one attention function per
registered kind (`register_attention_functions`). That function receives HF's q, k, v (after
RoPE and the KV cache) and runs them as truthgpt's own attention layer does
(`attend_layer`), so the layer scores are −λ_h·d(q_i, k_j) with the fastest backend for the
device (native C++ on CPU, Triton on CUDA). HF's `scaling` (1/√D) is ignored: λ is the scale.

`distance_lambda` holds log λ, as truthgpt's own layer does (`DistanceAttention.log_lambda`):
λ = exp(distance_lambda) clamped to [LAMBDA_MIN, LAMBDA_MAX], positive whatever an optimizer
does to the parameter. `lambdas(model)` reads the λ values.

Masks: the `truthgpt_<kind>` names are registered with `AttentionMaskInterface` as SDPA's
boolean masks, so padding (left or right), packed sequences and sliding windows arrive as a
(B, 1, Tq, Tk) keep-mask, and no mask at all where causal alone is exact (HF's `is_causal`
fast path); the function then aligns the causal rule as SDPA does.

Saving: `save_pretrained` writes `distance_lambda` with the weights and the kind in
config.json (`truthgpt_distance`); `use_distance_attention(AutoModelForCausalLM.
from_pretrained(folder))` reads both back (transformers itself drops the unknown λ keys while
loading, with a warning naming them).
"""

from __future__ import annotations

import functools
import math
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

try:
    import transformers  # noqa: F401
except ImportError as err:
    raise ImportError(
        "truthgpt.workflows.hf_attention needs Hugging Face transformers: "
        "pip install 'truthgpt[hf]'"
    ) from err
from transformers import AttentionInterface, PreTrainedModel
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from truthgpt.config import LAMBDA_MAX, LAMBDA_MIN
from truthgpt.nn.attention import default_lambda, kinds
from truthgpt.nn.attention.functional import AttentionCall, attend_layer, check_dropout, check_p
from truthgpt.nn.attention.kinds import DistanceKind

ATTN_PREFIX = "truthgpt_"  # attn_implementation = ATTN_PREFIX + kind name
LAMBDA_PARAM = "distance_lambda"  # the per-head log λ on every attention module
P_ATTR = "distance_p"  # the exponent of kind "lp", a plain attribute of the module
CONFIG_KEY = "truthgpt_distance"  # config.json entry: {"kind", "p", "learnable_lambda"}

# Keyword arguments some architectures pass to the attention function, that change the scores
# in ways a distance kernel cannot reproduce: name -> why.
_UNSUPPORTED_KWARGS = {
    "position_bias": "an additive position bias (ALiBi, T5-style) tuned for dot-product scores",
    "softcap": "logit soft-capping (tanh of the dot-product score)",
    "s_aux": "attention sinks (an extra learned logit per head)",
    "sinks": "attention sinks (an extra learned logit per head)",
}


def attn_implementation(kind: str) -> str:
    """The `attn_implementation` name of a kind (an alias resolves to its kind's name)."""
    return ATTN_PREFIX + kinds.get(kind).name


# --------------------------------------------------------------------------------------------
# the attention function


@functools.cache
def _head_index(kv_heads: int, groups: int, device: torch.device) -> Tensor:
    """Query head h reads key/value head h // groups."""
    return torch.arange(kv_heads, device=device).repeat_interleave(groups)


def _repeat_kv(x: Tensor, groups: int) -> Tensor:
    """(B, Hkv, T, D) -> (B, Hkv·groups, T, D), each key/value head shared by `groups` heads
    (one gather with a kept index: a decoding step calls this twice per layer)."""
    if groups == 1:
        return x
    return x.index_select(1, _head_index(x.shape[1], groups, x.device))


def distance_attention_forward(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    *,
    kind: str | DistanceKind,
    scaling: float | None = None,
    dropout: float = 0.0,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[Tensor, Tensor | None]:
    """HF's attention-function contract on top of `distance_attention`.

    query (B, H, Tq, D), key and value (B, Hkv, Tk, D) with H a multiple of Hkv (grouped-query
    attention: each key/value head serves H/Hkv query heads); attention_mask None or a
    boolean keep-mask / additive float mask broadcastable to (B, 1, Tq, Tk) that already holds
    the causal rule. Returns ((B, Tq, H, D), weights or None). `scaling` is ignored: the
    module's λ scales the distances.
    """
    log_lambda = getattr(module, LAMBDA_PARAM, None)
    if not isinstance(log_lambda, Tensor):
        raise ValueError(
            f"{type(module).__name__} has no {LAMBDA_PARAM} parameter: convert the model with "
            f"truthgpt.hf.use_distance_attention(model, {kind!r}) instead of setting "
            f"attn_implementation={attn_implementation(kind)!r} alone"
        )
    for name, why in _UNSUPPORTED_KWARGS.items():
        if kwargs.get(name) is not None:
            raise ValueError(
                f"{type(module).__name__} passes {name}= ({why}); distance attention cannot "
                "honour it"
            )
    H, Hkv = query.shape[1], key.shape[1]
    if H % Hkv != 0 or log_lambda.shape != (H,):
        raise ValueError(
            f"{type(module).__name__}: {H} query heads, {Hkv} key/value heads and "
            f"{LAMBDA_PARAM} of shape {tuple(log_lambda.shape)} do not fit (need H % Hkv == 0 "
            f"and shape ({H},))"
        )
    key, value = _repeat_kv(key, H // Hkv), _repeat_kv(value, H // Hkv)
    Tq, Tk = query.shape[2], key.shape[2]
    if is_causal is None:
        is_causal = getattr(module, "is_causal", True)
    if attention_mask is None:
        # No mask: causal alone is exact (HF skipped the mask). Tq = 1 sees every key; Tk > Tq
        # with Tq > 1 is the prefill of an empty static cache, whose slots past Tq are unused.
        causal = bool(is_causal) and Tq > 1
        if causal and Tk > Tq:
            key, value = key[:, :, :Tq], value[:, :, :Tq]
    else:
        causal = False  # HF's mask holds the causal rule (and padding, windows, packing)
    wide = torch.promote_types(log_lambda.dtype, torch.float32)  # exp of a bf16 log λ: fp32
    lam = log_lambda.to(wide).exp().clamp(LAMBDA_MIN, LAMBDA_MAX).to(query.dtype)
    # The call is built here rather than by `distance_attention`: λ is positive by
    # construction and HF's tensors have their shapes, so only the mask is checked (a
    # decoding step of a small model otherwise spends more time in checks than attending).
    spec = kind if isinstance(kind, DistanceKind) else kinds.get(kind)
    p = check_p(getattr(module, P_ATTR, None), spec)
    call = AttentionCall(spec, lam, causal, attention_mask, p, check_dropout(float(dropout)))
    out, weights = attend_layer(query, key, value, call, bool(kwargs.get("output_attentions")))
    return out.transpose(1, 2).contiguous(), weights  # (B, Tq, H, D)


def _attention_function(kind: str) -> Callable[..., tuple[Tensor, Tensor | None]]:
    spec = kinds.get(kind)  # resolved once, not at every call

    def forward(module, query, key, value, attention_mask, **kwargs):
        return distance_attention_forward(
            module, query, key, value, attention_mask, kind=spec, **kwargs
        )

    forward.__name__ = forward.__qualname__ = f"{ATTN_PREFIX}{kind}_attention_forward"
    forward.__doc__ = f"Distance attention of kind {kind!r} (see distance_attention_forward)."
    return forward


def register_attention_functions() -> tuple[str, ...]:
    """Register `truthgpt_<kind>` with transformers for every kind registered now (built-in
    and `register_distance`'s), with SDPA's masks; returns the names."""
    names = []
    for kind in kinds.names():
        name = ATTN_PREFIX + kind
        AttentionInterface.register(name, _attention_function(kind))
        AttentionMaskInterface.register(name, sdpa_mask)
        names.append(name)
    return tuple(names)


# --------------------------------------------------------------------------------------------
# converting a model


def _check_architecture(model: PreTrainedModel) -> None:
    """Raise ValueError naming the architecture when its attention cannot be switched."""
    cls = type(model).__name__
    if not (type(model).is_backend_compatible() and type(model)._can_set_attn_implementation()):
        raise ValueError(
            f"{cls} does not route its attention through transformers' AttentionInterface "
            "(ALL_ATTENTION_FUNCTIONS), so attn_implementation cannot reach its layers"
        )
    config = model.config.get_text_config()
    if getattr(config, "alibi", False) or getattr(config, "position_embedding_type", "") == "alibi":
        raise ValueError(
            f"{cls} adds ALiBi biases tuned for dot-product scores to its attention; distance "
            "attention cannot honour them"
        )
    if getattr(config, "attn_logit_softcapping", None) is not None:
        raise ValueError(
            f"{cls} soft-caps its attention logits (attn_logit_softcapping); distance attention "
            "cannot honour it: set config.attn_logit_softcapping = None first"
        )


def _head_size(module: nn.Module) -> int | None:
    for attr in ("head_dim", "head_size"):
        value = getattr(module, attr, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def attention_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of the self-attention layers: `*Attention` modules with a layer index
    and a head size (every architecture that calls the AttentionInterface has both)."""
    found = []
    for name, module in model.named_modules():
        if (
            type(module).__name__.endswith("Attention")
            and hasattr(module, "layer_idx")
            and _head_size(module) is not None
        ):
            found.append((name, module))
    return found


def _check_lambda_init(lambda_init: float | None) -> None:
    if lambda_init is None:
        return
    if isinstance(lambda_init, bool) or not isinstance(lambda_init, (int, float)):
        raise ValueError(f"lambda_init must be a positive float or None, got {lambda_init!r}")
    if not LAMBDA_MIN <= lambda_init <= LAMBDA_MAX:
        raise ValueError(f"lambda_init must be in [{LAMBDA_MIN}, {LAMBDA_MAX}], got {lambda_init}")


def use_distance_attention(
    model: PreTrainedModel,
    kind: str | None = None,
    *,
    learnable_lambda: bool = True,
    lambda_init: float | None = None,
    p: float | None = None,
) -> PreTrainedModel:
    """Switch every attention layer of `model` to distance attention of `kind`, in place.

    Args:
        model: a transformers causal LM whose attention goes through `AttentionInterface`.
        kind: a registered distance kind (`truthgpt.nn.attention.kinds.names()`); None takes
            the kind recorded by an earlier conversion (config.json's `truthgpt_distance`),
            else "l1".
        learnable_lambda: whether λ trains (a Parameter either way, so checkpoints match).
        lambda_init: initial λ of every head; None takes the kind's default for the head
            size (`default_lambda`).
        p: the exponent of kind "lp".

    Adds `distance_lambda` (log λ, shape (heads,)) to each attention module, registers the
    `truthgpt_<kind>` attention functions and sets the model's attention implementation.
    A model loaded from a converted folder gets that folder's λ back (same kind only).
    Returns the model.
    """
    if not isinstance(model, PreTrainedModel):
        raise ValueError(
            f"model must be a transformers PreTrainedModel, got {type(model).__name__}"
        )
    record = getattr(model.config, CONFIG_KEY, None)
    record = record if isinstance(record, dict) else None
    if kind is None:
        kind = record["kind"] if record else "l1"
        if record and p is None:
            p = record.get("p")
    spec = kinds.get(kind)  # ValueError naming an unknown kind
    _check_lambda_init(lambda_init)
    if spec.takes_p:
        default_lambda(spec, 1, p=p)  # checks p
    else:
        p = None
    _check_architecture(model)
    modules = attention_modules(model)
    if not modules:
        raise ValueError(
            f"{type(model).__name__} has no attention modules with a head size and layer index "
            "(…Attention with head_dim or head_size)"
        )
    heads = model.config.get_text_config().num_attention_heads
    for _, module in modules:
        head_dim = _head_size(module)
        init = lambda_init if lambda_init is not None else default_lambda(spec, head_dim, p=p)
        like = next(module.parameters(), None)
        dtype = like.dtype if like is not None and like.is_floating_point() else torch.float32
        device = like.device if like is not None else None
        value = torch.full((heads,), math.log(init), dtype=dtype, device=device)
        module.register_parameter(
            LAMBDA_PARAM, nn.Parameter(value, requires_grad=bool(learnable_lambda))
        )
        setattr(module, P_ATTR, p)
    if record and record.get("kind") == spec.name:
        _restore_lambdas(model, modules)
    register_attention_functions()
    model.set_attn_implementation(attn_implementation(spec.name))
    for config in {id(c): c for c in (model.config, model.config.get_text_config())}.values():
        setattr(
            config,
            CONFIG_KEY,
            {"kind": spec.name, "p": p, "learnable_lambda": bool(learnable_lambda)},
        )
    return model


def _restore_lambdas(model: PreTrainedModel, modules: list[tuple[str, nn.Module]]) -> None:
    """Copy the saved `distance_lambda` values of the folder the model was loaded from."""
    name = str(getattr(model, "name_or_path", "") or "")
    if not name:  # built from a config that an earlier conversion marked: nothing saved yet
        return
    folder = Path(name)
    files = sorted(folder.glob("*.safetensors")) if folder.is_dir() else []
    if not files:
        warnings.warn(
            f"truthgpt: the config records distance attention but {str(folder)!r} holds no "
            "safetensors weights to read distance_lambda from; λ starts at its default",
            RuntimeWarning,
            stacklevel=3,
        )
        return
    from safetensors import safe_open

    saved: dict[str, Tensor] = {}
    suffix = "." + LAMBDA_PARAM
    for file in files:
        with safe_open(os.fspath(file), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                if key.endswith(suffix):
                    saved[key] = f.get_tensor(key)
    missing = []
    for name, module in modules:
        value = _saved_value(saved, name + suffix)
        if value is None:
            missing.append(name + suffix)
            continue
        param = getattr(module, LAMBDA_PARAM)
        if value.shape != param.shape:
            raise ValueError(
                f"{name + suffix} in {folder} has shape {tuple(value.shape)}, the model needs "
                f"{tuple(param.shape)}"
            )
        with torch.no_grad():
            param.copy_(value.to(param.dtype))
    if missing:
        raise ValueError(f"{folder} records distance attention but lacks {missing[0]}")


def _saved_value(saved: dict[str, Tensor], key: str) -> Tensor | None:
    """The saved tensor for a module key, allowing for a base-model prefix on either side
    (a causal LM saved as `model.layers…`, loaded bare as `layers…`, or the reverse)."""
    if key in saved:
        return saved[key]
    for other, value in saved.items():
        if other.endswith("." + key) or key.endswith("." + other):
            return value
    return None


def lambdas(model: nn.Module) -> dict[str, Tensor]:
    """The effective λ per head of every converted attention module, by module name."""
    return {
        name: getattr(module, LAMBDA_PARAM).detach().float().exp().clamp(LAMBDA_MIN, LAMBDA_MAX)
        for name, module in model.named_modules()
        if isinstance(getattr(module, LAMBDA_PARAM, None), Tensor)
    }


register_attention_functions()
