"""Hugging Face `transformers` integration: `AutoModelForCausalLM` can load a TruthGPT model.

Importing this module registers `TruthGPTHFConfig` (model_type "truthgpt") and
`TruthGPTForCausalLM` with `AutoConfig` / `AutoModelForCausalLM`; `export_hf` writes a run
as a folder those classes, `generate()` and `AutoTokenizer` read. The folder also carries
these classes' code, copied from truthgpt's source by `hf_remote`, so it loads without truthgpt:

    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained("exported/", trust_remote_code=True)
    tokenizer = AutoTokenizer.from_pretrained("exported/", trust_remote_code=True)

`TruthGPTForCausalLM` and `TruthGPTHFConfig` are copied into that code verbatim, beside the
model core's files: they may use only the core (`TruthGPTModel`, `TruthGPTConfig`,
`slide_keep`), torch and transformers.

transformers is an optional dependency (`pip install truthgpt[hf]`); nothing else in truthgpt
imports it.
"""

from __future__ import annotations

import dataclasses
import sys
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
from truthgpt.core.generation import slide_keep
from truthgpt.core.kinds import builtin_names
from truthgpt.io import resolve_checkpoint
from truthgpt.io.files import read_json_file
from truthgpt.io.folders import check_output, write_owned_folder
from truthgpt.nn.model import TruthGPTModel
from truthgpt.training.checkpoint import read_tokenizer
from truthgpt.workflows import hf_remote

_FIELDS = tuple(f.name for f in dataclasses.fields(TruthGPTConfig))


def _model_fields() -> dict[str, Any]:
    """The class namespace of `TruthGPTConfig`'s fields (annotations and defaults): the HF
    config takes them from the dataclass itself, so a field added to the model's config is
    one of the HF config's too, with the same name, type and default."""
    fields = dataclasses.fields(TruthGPTConfig)
    # transformers builds a config with no arguments: the one required field gets GPT-2's
    # vocabulary size, as transformers' own GPT-2 config does.
    namespace: dict[str, Any] = {
        f.name: 50257 if f.default is dataclasses.MISSING else f.default for f in fields
    }
    namespace["__annotations__"] = {f.name: f.type for f in fields}
    namespace["__module__"] = __name__
    return namespace


# transformers makes each PreTrainedConfig subclass a dataclass of its annotated fields.
_TruthGPTFields = type("_TruthGPTFields", (PreTrainedConfig,), _model_fields())


class TruthGPTHFConfig(_TruthGPTFields):
    """`TruthGPTConfig`'s fields as a transformers config (same names, same defaults)."""

    model_type = "truthgpt"

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
        # First position of the window that generation without a cache feeds the model.
        self._window_start = 0
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

    def prepare_inputs_for_generation(
        self,
        input_ids: Tensor,
        next_sequence_length: int | None = None,
        cache: Cache | None = None,
        attention_mask: Tensor | None = None,
        is_first_iteration: bool | None = False,
        **kwargs: Any,
    ) -> dict[str, Any]:
        """Feed `generate()` the window `truthgpt generate` would, instead of overflowing it.

        Learned positions stop at `max_position_embeddings` (other positions take any
        length, and the whole input goes in). As in truthgpt's generation, a
        longer prompt is cut to its last window of tokens, and once the window is full the
        newest `slide_keep(window)` tokens are re-encoded from position 0 (the cache emptied
        and rebuilt), after which decoding goes on one token at a time. With a cache the
        window's start follows from what the cache holds; without one it is remembered from
        the previous step, so both give the same tokens.
        """
        window = self.model.config.position_limit  # None: rope, alibi, none take any length
        length = input_ids.shape[1]
        cached = cache.get_seq_length() if cache is not None else 0
        if window is None:
            start = 0
        elif cache is not None and cached > 0:
            new = next_sequence_length if next_sequence_length is not None else length - cached
            start = length - new - cached  # the cache holds input_ids[:, start : -new]
            if cached + new > window:
                cache.reset()
                start, next_sequence_length = length - slide_keep(window), None
        elif cache is not None or is_first_iteration or self._window_start > length:
            start = max(0, length - window)
            next_sequence_length = None
        else:  # no cache: slide exactly when the cached run would
            start = self._window_start
            if length - start > window:
                start = length - slide_keep(window)
        self._window_start = start
        if start > 0:
            input_ids = input_ids[:, start:]
            if attention_mask is not None:
                attention_mask = attention_mask[:, start:]
        return super().prepare_inputs_for_generation(
            input_ids,
            next_sequence_length=next_sequence_length,
            cache=cache,
            attention_mask=attention_mask,
            is_first_iteration=is_first_iteration,
            **kwargs,
        )


AutoConfig.register(TruthGPTHFConfig.model_type, TruthGPTHFConfig, exist_ok=True)
AutoModelForCausalLM.register(TruthGPTHFConfig, TruthGPTForCausalLM, exist_ok=True)


# ------------------------------------------------------------------------------- tokenizers


# The end-of-text token of every export: GPT-2's own, and added to char and BPE vocabularies.
END_OF_TEXT = "<|endoftext|>"


def hf_tokenizer(tokenizer: Any) -> PreTrainedTokenizerFast:
    """A `PreTrainedTokenizerFast` giving the same ids as a truthgpt tokenizer, plus an
    end-of-text token (its eos and bos) for those that have none.

    Evaluation harnesses need one: lm-eval starts every context with it and stops generation
    at it. char and BPE vocabularies get `END_OF_TEXT` as one more id, `vocab_size`, for
    which `export_hf` adds an embedding row; GPT-2's `<|endoftext|>` is already in its
    vocabulary. Text is encoded as before, except that the literal string `END_OF_TEXT`
    becomes that one token, as in GPT-2's own Hugging Face tokenizer.
    """
    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
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
    if kind != "gpt2":
        rust.add_special_tokens([AddedToken(END_OF_TEXT, special=True, normalized=False)])
        if rust.token_to_id(END_OF_TEXT) != tokenizer.vocab_size:
            raise ValueError(
                f"tokenizer: {END_OF_TEXT!r} got id {rust.token_to_id(END_OF_TEXT)}, expected "
                f"{tokenizer.vocab_size} (one past the vocabulary)"
            )
        special.update(eos_token=END_OF_TEXT, bos_token=END_OF_TEXT)
    return PreTrainedTokenizerFast(
        tokenizer_object=rust,
        clean_up_tokenization_spaces=False,
        model_max_length=int(1e30),
        **special,
    )


# ------------------------------------------------------------------------------- export


def with_new_tokens(model: TruthGPTModel, vocab_size: int) -> TruthGPTModel:
    """`model` with rows for ids `model.config.vocab_size` .. `vocab_size - 1` (the end-of-text
    token), each the mean of the trained rows, in the token embedding and the LM head.

    The model never saw the token, so its row is an average token: as an input (lm-eval's
    first context token) it is the centre of the embeddings, and as an output its logit is the
    mean of all other logits (the head is linear), below the largest, so greedy decoding never
    picks it and the logits of every other id are unchanged.
    """
    old = model.config.vocab_size
    if vocab_size <= old:
        return model
    grown = TruthGPTModel(dataclasses.replace(model.config, vocab_size=vocab_size)).eval()
    state = model.state_dict()
    for name in ("wte.weight", "lm_head.weight"):
        rows = state[name]
        state[name] = torch.cat([rows, rows.mean(0, keepdim=True).expand(vocab_size - old, -1)])
    if model.config.tie_word_embeddings:
        state["lm_head.weight"] = state["wte.weight"]
    grown.load_state_dict(state)
    return grown


def export_hf(source: str | Path, out_dir: str | Path, *, overwrite: bool = False) -> Path:
    """Write the model (and tokenizer) of a run or checkpoint as a transformers folder.

    For a built-in distance kind the folder also holds the model's code (`hf_remote`), so
    `from_pretrained(out_dir, trust_remote_code=True)` needs no truthgpt; a kind added with
    `register_distance` still needs `import truthgpt.hf` and the kind registered.
    """
    folder = resolve_checkpoint(source)
    target = {
        "kind": "export",
        "replace": overwrite,
        "replace_flag": "--overwrite",
        "inputs": [source, folder],
        "legacy": is_export,
    }
    check_output(out_dir, **target)  # before any work; again before the rename
    model = TruthGPTModel.from_pretrained(folder)
    saved_tokenizer = read_tokenizer(folder)
    tokenizer = hf_tokenizer(saved_tokenizer) if saved_tokenizer is not None else None

    ids = {}
    if tokenizer is not None:
        model = with_new_tokens(model, len(tokenizer))
        ids = {
            "eos_token_id": tokenizer.eos_token_id,
            "bos_token_id": tokenizer.bos_token_id,
        }
    hf_model = TruthGPTForCausalLM(TruthGPTHFConfig.from_truthgpt(model.config, **ids))
    hf_model.model.load_state_dict(model.state_dict())
    hf_model.eval()
    remote_code = model.config.distance_type in builtin_names()
    if remote_code:
        hf_model.config.auto_map = dict(hf_remote.AUTO_MAP)

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
        if remote_code:
            hf_remote.write_remote_code(tmp, sys.modules[__name__])

    return write_owned_folder(out_dir, write=write, **target)


# What `export_hf` writes (transformers' own names, the glue and the core's files; a
# tokenizer adds the last three).
EXPORT_FILES = frozenset(
    {
        "config.json",
        "generation_config.json",
        "model.safetensors",
        hf_remote.CONFIG_FILE,
        hf_remote.MODELING_FILE,
        *hf_remote.CORE_FILES,
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
    }
)


def is_export(folder: Path) -> bool:
    """Whether `folder` is an export of a release before folder markers: only the files an
    export writes, and a config.json of model_type "truthgpt"."""
    try:
        names = {p.name for p in folder.iterdir()}
        config = read_json_file(folder / "config.json", what="config.json")
    except (OSError, ValueError):
        return False
    return (
        names <= EXPORT_FILES
        and isinstance(config, dict)
        and config.get("model_type") == (TruthGPTHFConfig.model_type)
    )
