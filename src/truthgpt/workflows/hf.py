"""Hugging Face `transformers` integration: `AutoModelForCausalLM` can load a TruthGPT model.

Importing this module registers `TruthGPTHFConfig` (model_type "truthgpt") and
`TruthGPTForCausalLM` with `AutoConfig` / `AutoModelForCausalLM`; `export_hf` writes a run
as a folder those classes, `generate()` and `AutoTokenizer` read:

    import truthgpt.workflows.hf
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained("exported/")
    tokenizer = AutoTokenizer.from_pretrained("exported/")

transformers is an optional dependency (`pip install truthgpt[hf]`); nothing else in truthgpt
imports it.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor

try:
    import transformers  # noqa: F401
except ImportError as err:
    raise ImportError(
        "truthgpt.workflows.hf needs Hugging Face transformers: pip install 'truthgpt[hf]'"
    ) from err
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    GenerationMixin,
    PreTrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.utils import logging as hf_logging

from truthgpt.config import TruthGPTConfig
from truthgpt.io import resolve_checkpoint
from truthgpt.io.atomic import refuse_non_empty, refuse_non_folder, write_folder_atomically
from truthgpt.nn.model import TruthGPTModel
from truthgpt.training.checkpoint import read_tokenizer

_FIELDS = tuple(f.name for f in dataclasses.fields(TruthGPTConfig))


class TruthGPTHFConfig(PreTrainedConfig):
    """`TruthGPTConfig`'s fields as a transformers config (same names, same defaults)."""

    model_type = "truthgpt"

    vocab_size: int = 50257
    hidden_size: int = 512
    num_hidden_layers: int = 4
    num_attention_heads: int = 8
    intermediate_size: int | None = None
    max_position_embeddings: int = 1024
    hidden_dropout_prob: float = 0.0
    attention_probs_dropout_prob: float = 0.0
    distance_type: str = "l1"
    lambda_param: float | None = None
    use_learnable_lambda: bool = True
    p_norm: float | None = None
    tie_word_embeddings: bool = True
    layer_norm_eps: float = 1e-5
    bias: bool = True
    use_cache: bool = True
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None

    def to_truthgpt(self) -> TruthGPTConfig:
        return TruthGPTConfig(**{name: getattr(self, name) for name in _FIELDS})

    @classmethod
    def from_truthgpt(cls, config: TruthGPTConfig, **kwargs: Any) -> TruthGPTHFConfig:
        return cls(**config.to_dict(), **kwargs)


class TruthGPTForCausalLM(PreTrainedModel, GenerationMixin):
    """`TruthGPTModel` behind the transformers interface (forward, generate, save/load)."""

    config_class = TruthGPTHFConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _tied_weights_keys: ClassVar[dict[str, str]] = {"model.lm_head.weight": "model.wte.weight"}

    def __init__(self, config: TruthGPTHFConfig) -> None:
        super().__init__(config)
        self.model = TruthGPTModel(config.to_truthgpt())
        self.post_init()

    def _init_weights(self, module: torch.nn.Module) -> None:
        TruthGPTModel._init_weights(module)

    def get_input_embeddings(self) -> torch.nn.Embedding:
        return self.model.wte

    def get_output_embeddings(self) -> torch.nn.Linear:
        return self.model.lm_head

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        cache: Cache | None = None,
        labels: Tensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        **kwargs: Any,  # position_ids, return_dict, …: positions follow from the cache
    ) -> CausalLMOutputWithPast:
        """Logits (and loss for `labels`); with a cache, only the new tokens are passed."""
        past_length = cache.get_seq_length() if cache is not None else 0
        past = tuple((layer.keys, layer.values) for layer in cache.layers) if past_length else None
        if attention_mask is not None and bool(attention_mask.all()):
            attention_mask = None  # no padding: take the unmasked path, as TruthGPTModel would
        use_cache = cache is not None or bool(use_cache)
        out = self.model(
            input_ids,
            labels=labels,
            attention_mask=attention_mask,
            output_attentions=bool(output_attentions),
            past_key_values=past,
            use_cache=use_cache,
        )
        if use_cache:
            # TruthGPTModel returns each layer's whole (past + new) keys and values; the cache
            # wants only the new ones.
            cache = cache if cache is not None else DynamicCache(config=self.config)
            assert out.past_key_values is not None
            for index, (keys, values) in enumerate(out.past_key_values):
                cache.update(keys[:, :, past_length:], values[:, :, past_length:], index)
        return CausalLMOutputWithPast(
            loss=out.loss,
            logits=out.logits,
            cache=cache if use_cache else None,
            attentions=out.attentions,
        )


AutoConfig.register(TruthGPTHFConfig.model_type, TruthGPTHFConfig, exist_ok=True)
AutoModelForCausalLM.register(TruthGPTHFConfig, TruthGPTForCausalLM, exist_ok=True)


# ------------------------------------------------------------------------------- tokenizers


def hf_tokenizer(tokenizer: Any) -> PreTrainedTokenizerFast:
    """A `PreTrainedTokenizerFast` giving the same ids as a truthgpt tokenizer."""
    from tokenizers import Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as RustTokenizer

    kind = getattr(tokenizer, "kind", None)
    special: dict[str, str] = {}
    if kind == "char":
        vocab = {token: i for i, token in enumerate(tokenizer.itos)}
        rust = RustTokenizer(models.WordLevel(vocab, unk_token=tokenizer.unk_token))
        # Every character, newlines included, is a token of its own; decoding just joins them.
        rust.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
        rust.decoder = decoders.Fuse()
        if tokenizer.unk_token is not None:
            special["unk_token"] = tokenizer.unk_token
    elif kind == "bpe":
        rust = RustTokenizer.from_str(tokenizer.hf_tokenizer.to_str())
    elif kind == "gpt2":
        from truthgpt.data.tokenization import GPT2_EOT, gpt2_file

        rust = RustTokenizer(
            models.BPE.from_file(str(gpt2_file("encoder.json")), str(gpt2_file("vocab.bpe")))
        )
        rust.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        rust.decoder = decoders.ByteLevel()
        special = {"eos_token": GPT2_EOT, "bos_token": GPT2_EOT}
    else:
        raise ValueError(
            f"tokenizer: cannot export a {type(tokenizer).__name__} (kind {kind!r}); "
            "expected a char, bpe or gpt2 tokenizer"
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=rust,
        clean_up_tokenization_spaces=False,
        model_max_length=int(1e30),
        **special,
    )


# ------------------------------------------------------------------------------- export


def export_hf(source: str | Path, out_dir: str | Path, *, overwrite: bool = False) -> Path:
    """Write the model (and tokenizer) of a run or checkpoint as a transformers folder."""
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())) and not overwrite:
        raise FileExistsError(f"{out_dir}: exists and is not empty; pass --overwrite to replace it")
    folder = resolve_checkpoint(source)
    model = TruthGPTModel.from_pretrained(folder)
    saved_tokenizer = read_tokenizer(folder)
    tokenizer = hf_tokenizer(saved_tokenizer) if saved_tokenizer is not None else None

    ids = {}
    if tokenizer is not None:
        ids = {
            "eos_token_id": tokenizer.eos_token_id,
            "bos_token_id": tokenizer.bos_token_id,
        }
    hf_model = TruthGPTForCausalLM(TruthGPTHFConfig.from_truthgpt(model.config, **ids))
    hf_model.model.load_state_dict(model.state_dict())
    hf_model.eval()

    def write(tmp: Path) -> None:
        bar = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()  # one small file: a progress bar is only noise
        try:
            hf_model.save_pretrained(tmp)
        finally:
            if bar:
                hf_logging.enable_progress_bar()
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)

    check = refuse_non_folder if overwrite else refuse_non_empty
    return write_folder_atomically(out_dir, write, check=check)
