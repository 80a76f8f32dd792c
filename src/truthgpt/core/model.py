"""The TruthGPT language model, readable top to bottom: MLP, block, model.

A GPT-2 style decoder (pre-LayerNorm blocks, GELU MLP, tied LM head) whose attention is
`DistanceAttention`: scores are −λ_h · d(q, k) for the configured distance. Positions are
the config's `position_embedding`: a learned table (GPT-2's, the default), rotary q and k
(`truthgpt.nn.positions`), ALiBi's −m·|i − j| on the scores, or none; only the table limits
the length of the input.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .cache import KVCache, LayerCache
from .config import LAMBDA_MAX, LAMBDA_MIN, TruthGPTConfig
from .inputs import check_token_ids
from .module import DistanceAttention, default_lambda, distance_kind
from .positions import RotaryEmbedding

# One (k, v) pair per layer, each (B, H, T_past, head_dim) (the Hugging Face layout).
PastKeyValues = tuple[tuple[Tensor, Tensor], ...]


@dataclass
class CausalLMOutput:
    """Named outputs, so callers never depend on the order of a tuple."""

    logits: Tensor  # (B, T, vocab)
    loss: Tensor | None = None  # mean next-token cross-entropy, when labels were given
    attentions: tuple[Tensor, ...] | None = None  # per layer (B, H, T, T_total)
    past_key_values: PastKeyValues | KVCache | None = None


# The width at which the distance kinds' default λ were tuned (the char-small preset).
LAMBDA_REFERENCE_WIDTH = 128


def initial_lambda(config: TruthGPTConfig) -> float:
    """The λ every head starts at: `lambda_param` when set, else the kind's default λ
    (`default_lambda`), which for the norms of q − k (l1, l2, chebyshev, lp: the kinds with
    `linear_in_scale`) is scaled by √(LAMBDA_REFERENCE_WIDTH / hidden_size).

    Why: q and k start with entries of size 0.02·√hidden_size (layer-normed inputs times the
    N(0, 0.02²) projections), and a norm of q − k grows linearly with that size, so at a
    fixed λ a model 4× wider starts with distance scores 2× sharper. The scaling makes them
    start as sharp as at width 128 at every width; dot-product kinds keep the usual 1/√D.
    Measured in benchmarks/results/scale.md: at width 512 (the seed preset) l1 at the
    unscaled λ trails dot, at the scaled one it does not.
    """
    if config.lambda_param is not None:
        return float(config.lambda_param)
    kind = distance_kind(config.distance_type)
    lam = default_lambda(kind, config.head_dim, p=config.p_norm)
    if kind.linear_in_scale:
        lam *= math.sqrt(LAMBDA_REFERENCE_WIDTH / config.hidden_size)
    return min(max(lam, LAMBDA_MIN), LAMBDA_MAX)


class MLP(nn.Module):
    def __init__(self, config: TruthGPTConfig) -> None:
        super().__init__()
        assert config.intermediate_size is not None
        self.c_fc = nn.Linear(config.hidden_size, config.intermediate_size, bias=config.bias)
        self.c_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=config.bias)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x))))


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, config: TruthGPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps, bias=config.bias)
        self.attn = DistanceAttention(
            config.hidden_size,
            config.num_attention_heads,
            config.distance_type,
            lambda_init=initial_lambda(config),
            learnable_lambda=config.use_learnable_lambda,
            p=config.p_norm,
            dropout=config.attention_probs_dropout_prob,
            bias=config.bias,
            qk_norm=config.qk_norm,
            qk_norm_gain=config.qk_norm_gain,
            alibi=config.position_embedding == "alibi",
        )
        self.resid_dropout = nn.Dropout(config.hidden_dropout_prob)
        self.ln_2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps, bias=config.bias)
        self.mlp = MLP(config)

    def forward(
        self,
        x: Tensor,
        *,
        past_key_value: tuple[Tensor, Tensor] | LayerCache | None = None,
        use_cache: bool = False,
        attn_mask: Tensor | None = None,
        need_weights: bool = False,
        rope: tuple[Tensor, Tensor] | None = None,
    ) -> tuple[Tensor, tuple[Tensor, Tensor] | LayerCache | None, Tensor | None]:
        attn = self.attn(
            self.ln_1(x),
            past_key_value=past_key_value,
            use_cache=use_cache,
            attn_mask=attn_mask,
            need_weights=need_weights,
            rope=rope,
        )
        x = x + self.resid_dropout(attn.output)
        x = x + self.mlp(self.ln_2(x))
        return x, attn.past_key_value, attn.weights


class TruthGPTModel(nn.Module):
    """Decoder-only language model with distance attention."""

    def __init__(self, config: TruthGPTConfig) -> None:
        super().__init__()
        config.validate()
        # The config names the kind; the registry knows it (ConfigError if not). An alias is
        # stored as the kind's own name, so checkpoints always hold that.
        kind = distance_kind(config.distance_type)
        if config.distance_type != kind.name:
            config = dataclasses.replace(config, distance_type=kind.name)
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.hidden_size)
        positions = config.position_embedding
        self.wpe = (
            nn.Embedding(config.max_position_embeddings, config.hidden_size)
            if positions == "learned"
            else None
        )
        self.rotary = (
            RotaryEmbedding(config.rotary_dim, config.rope_theta) if positions == "rope" else None
        )
        self.drop = nn.Dropout(config.hidden_dropout_prob)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.num_hidden_layers))
        self.ln_f = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps, bias=config.bias)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.wte.weight

        # GPT-2 init: N(0, 0.02), residual projections scaled by 1/√(2·layers) so the residual
        # stream's variance does not grow with depth. λ keeps the attention module's own init.
        self.apply(self._init_weights)
        residual_std = 0.02 / math.sqrt(2 * config.num_hidden_layers)
        for name, param in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(param, mean=0.0, std=residual_std)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    # ------------------------------------------------------------------ forward

    def forward(
        self,
        input_ids: Tensor,
        labels: Tensor | None = None,
        attention_mask: Tensor | None = None,
        output_attentions: bool = False,
        past_key_values: PastKeyValues | KVCache | None = None,
        use_cache: bool = False,
    ) -> CausalLMOutput:
        """Logits for every position, and the shifted next-token loss when `labels` are given.

        `labels` follow the Hugging Face convention: equal to the inputs (the model shifts
        them), with −100 marking positions to ignore. `attention_mask` (B, T_past + T) marks
        real tokens with 1 and padding with 0; positions count real tokens only, so a
        left-padded row gives the logits it would give unpadded.
        """
        layer_past: Sequence[tuple[Tensor, Tensor] | LayerCache] | None
        if isinstance(past_key_values, KVCache):  # appended to in place
            layer_past, past_length, use_cache = (
                past_key_values.layers,
                past_key_values.length,
                True,
            )
        else:
            layer_past = past_key_values
            past_length = past_key_values[0][0].shape[-2] if past_key_values else 0
        if layer_past is not None and len(layer_past) != len(self.blocks):
            raise ValueError(
                f"past_key_values: expected {len(self.blocks)} layers, got {len(layer_past)}"
            )
        batch, length = self._check_input_ids(input_ids, decoding=past_length > 0)
        total = past_length + length
        limit = self.config.position_limit
        if limit is not None and total > limit:
            raise ValueError(
                f"input_ids: sequence of {total} positions (past {past_length} + new {length}) "
                f"exceeds max_position_embeddings={limit} (the learned position table; "
                "position_embedding rope, alibi or none take any length)"
            )
        attn_mask = self._padding_mask(attention_mask, batch, total)

        if attention_mask is None:
            positions = torch.arange(past_length, total, device=input_ids.device)  # (T,)
        else:  # a left-padded row counts positions from its first real token, like unpadded
            counted = attention_mask.to(torch.long).cumsum(-1) - 1
            positions = counted.clamp(min=0)[:, past_length:total]  # (B, T)
        x = self.wte(input_ids)  # (B, T, C)
        if self.wpe is not None:
            x = x + self.wpe(positions)
        x = self.drop(x)
        rope = self.rotary(positions) if self.rotary is not None else None
        presents: list[tuple[Tensor, Tensor] | LayerCache] = []
        attentions: list[Tensor] = []
        for i, block in enumerate(self.blocks):
            x, present, weights = block(
                x,
                past_key_value=layer_past[i] if layer_past else None,
                use_cache=use_cache,
                attn_mask=attn_mask,
                need_weights=output_attentions,
                rope=rope,
            )
            if use_cache:
                assert present is not None
                presents.append(present)
            if output_attentions:
                assert weights is not None
                attentions.append(weights)
        logits = self.lm_head(self.ln_f(x))  # (B, T, vocab)

        loss = None
        if labels is not None:
            loss = self.loss(logits, labels)
        return CausalLMOutput(
            logits=logits,
            loss=loss,
            attentions=tuple(attentions) if output_attentions else None,
            past_key_values=(
                past_key_values
                if isinstance(past_key_values, KVCache)
                else (tuple(presents) if use_cache else None)
            ),
        )

    @staticmethod
    def loss(logits: Tensor, labels: Tensor) -> Tensor:
        """Mean cross-entropy of position t's logits against label t+1 (−100 ignored)."""
        if labels.shape != logits.shape[:2]:
            raise ValueError(
                f"labels: expected shape {tuple(logits.shape[:2])}, got {tuple(labels.shape)}"
            )
        shifted_logits = logits[:, :-1, :].float()
        shifted_labels = labels[:, 1:].long()
        return F.cross_entropy(
            shifted_logits.reshape(-1, shifted_logits.size(-1)),
            shifted_labels.reshape(-1),
            ignore_index=-100,
        )

    def _check_input_ids(self, input_ids: Tensor, decoding: bool) -> tuple[int, int]:
        """Shape and dtype always; the id range only where reading it costs no wait for a
        device (CPU tensors) and the ids are not the model's own samples (decoding steps).
        On an accelerator the ids are checked where they enter: prepared data on load, the
        trainer's batches before they are copied over, prompts before generation."""
        if not isinstance(input_ids, Tensor) or input_ids.dim() != 2:
            shape = tuple(input_ids.shape) if isinstance(input_ids, Tensor) else type(input_ids)
            raise ValueError(f"input_ids: expected a (batch, length) tensor, got {shape}")
        if input_ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
            raise ValueError(f"input_ids: expected integer token ids, got dtype {input_ids.dtype}")
        if input_ids.numel() == 0:
            raise ValueError("input_ids: empty input")
        if input_ids.device.type == "cpu" and not decoding:
            check_token_ids(input_ids, self.config.vocab_size)
        return input_ids.shape[0], input_ids.shape[1]

    @staticmethod
    def _padding_mask(attention_mask: Tensor | None, batch: int, total: int) -> Tensor | None:
        """(B, T_total) keep-mask of 1/0 → boolean (B, 1, 1, T_total) over keys."""
        if attention_mask is None:
            return None
        if attention_mask.shape != (batch, total):
            raise ValueError(
                f"attention_mask: expected shape ({batch}, {total}) covering past and new "
                f"tokens, got {tuple(attention_mask.shape)}"
            )
        return attention_mask.bool()[:, None, None, :]

    # ------------------------------------------------------------------ utilities

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        """Number of parameters, tied weights counted once."""
        params = {id(p): p for p in self.parameters()}
        total = sum(p.numel() for p in params.values())
        if exclude_embeddings:
            total -= self._position_parameters() + self.wte.weight.numel()
        return total

    def _position_parameters(self) -> int:
        return self.wpe.weight.numel() if self.wpe is not None else 0

    def lambdas(self) -> Tensor:
        """Effective λ of every head, shape (layers, heads)."""
        return torch.stack([block.attn.lambda_.detach() for block in self.blocks])

    def optimizer_groups(self, weight_decay: float, lambda_lr_scale: float = 1.0) -> list[dict]:
        """Parameter groups for AdamW: decay only ≥2-D weights (never λ, norms or biases).

        With lambda_lr_scale ≠ 1 the log λ of every head get a group of their own whose
        "lr_scale" the trainer multiplies into the schedule's rate: log λ otherwise moves
        only a few tenths in a whole run. With 1 the layout is the two groups of earlier
        releases, so their optimizer state keeps loading."""
        decay, no_decay, lam = [], [], []
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            if lambda_lr_scale != 1.0 and name.endswith("log_lambda"):
                lam.append(p)
            else:
                (decay if p.dim() >= 2 else no_decay).append(p)
        groups = [
            {"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
        if lam:
            groups.append({"params": lam, "weight_decay": 0.0, "lr_scale": lambda_lr_scale})
        return groups

    def flops_per_token(self, sequence_length: int) -> float:
        """Training FLOPs per token (forward + backward), PaLM appendix B: 6N + 12·L·C·T.

        N counts what is multiplied (nanoGPT's convention): the tied token embedding once,
        since it is the LM head's matmul (the largest one with a 50k vocabulary), and not the
        position embedding, which is only looked up. The attention term is counted as for
        dot-product attention, so MFU compares kinds on the same footing.
        """
        n = self.num_parameters() - self._position_parameters()
        cfg = self.config
        return 6 * n + 12 * cfg.num_hidden_layers * cfg.hidden_size * sequence_length

    @property
    def device(self) -> torch.device:
        return self.wte.weight.device

    # ------------------------------------------------------------------ generation

    @torch.no_grad()
    def generate(
        self,
        input_ids: Tensor | Sequence[int],
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        do_sample: bool = True,
        eos_token_id: int | None = None,
        seed: int | None = None,
        streamer: object | None = None,
        use_cache: bool = True,
    ) -> Tensor:
        """Continue `input_ids` (B, T) by up to `max_new_tokens`; see `truthgpt.nn.generation`."""
        from .generation import generate

        return generate(
            self,
            input_ids,
            max_new_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            do_sample=do_sample,
            eos_token_id=eos_token_id,
            seed=seed,
            streamer=streamer,
            use_cache=use_cache,
        )
