"""Train a small Llama-shaped model with the Hugging Face Trainer, with L1 distance attention.

    python examples/hf_trainer.py --attn truthgpt_l1 --steps 300
    python examples/hf_trainer.py --attn sdpa --steps 300       # the dot-product baseline

The model is random-initialised from a config (nothing is downloaded): 4 layers, 4 query heads
sharing 2 key/value heads, width 128, RoPE. The data are character blocks of truthgpt's
built-in Shakespeare corpus. One call, `use_distance_attention(model, "l1")`, is the whole
switch; the rest is ordinary transformers code. tests/test_hf_attention.py and
benchmarks/hf_models.py reuse these functions.
"""

from __future__ import annotations

import argparse
import math
import tempfile
from collections import Counter

import torch
from torch.utils.data import Dataset
from transformers import AutoModelForCausalLM, LlamaConfig, Trainer, TrainingArguments

from truthgpt.data.corpus import shakespeare_text
from truthgpt.data.tokenization import CharTokenizer
from truthgpt.hf import use_distance_attention


def llama_config(vocab_size: int, **overrides: object) -> LlamaConfig:
    """4 layers, 4 heads with 2 key/value heads, width 128, RoPE."""
    fields = dict(
        vocab_size=vocab_size,
        hidden_size=128,
        intermediate_size=344,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
    )
    fields.update(overrides)
    return LlamaConfig(**fields)


def build_model(config: LlamaConfig, attn: str, seed: int = 0) -> torch.nn.Module:
    """The model with `attn` ("sdpa", "eager" or "truthgpt_<kind>"), same weights per seed."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    if attn.startswith("truthgpt_"):
        use_distance_attention(model, attn.removeprefix("truthgpt_"))
    else:
        model.set_attn_implementation(attn)
    return model


class CharBlocks(Dataset):
    """Consecutive, non-overlapping blocks of `block` characters: the same data for every run."""

    def __init__(self, ids: torch.Tensor, block: int) -> None:
        n = len(ids) // block
        self.blocks = ids[: n * block].view(n, block)

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        x = self.blocks[i]
        return {"input_ids": x, "labels": x}  # the model shifts the labels itself


def shakespeare_chars(chars: int) -> tuple[CharTokenizer, torch.Tensor, torch.Tensor, float]:
    """Tokenizer, train ids, validation ids (the next chars/10 characters) and the unigram
    entropy of the train text in nats (the loss of a model that ignores context)."""
    text = shakespeare_text()[: chars + chars // 10]
    tokenizer = CharTokenizer.from_text(text)
    ids = torch.tensor(tokenizer.encode(text), dtype=torch.long)
    train, val = ids[:chars], ids[chars:]
    counts = Counter(train.tolist())
    unigram = -sum(c / chars * math.log(c / chars) for c in counts.values())
    return tokenizer, train, val, unigram


def train(
    model: torch.nn.Module,
    data: Dataset,
    *,
    steps: int,
    batch_size: int = 16,
    lr: float = 3e-3,
    seed: int = 0,
    schedule: str = "cosine",
    callbacks: list | None = None,
) -> list[float]:
    """HF Trainer run; returns the training loss of every step. `schedule`: the Trainer's
    lr_scheduler_type after a short warmup."""
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out,
            max_steps=steps,
            per_device_train_batch_size=batch_size,
            learning_rate=lr,
            warmup_steps=min(20, steps // 10),
            lr_scheduler_type=schedule,
            weight_decay=0.0,
            logging_steps=1,
            save_strategy="no",
            report_to=[],
            seed=seed,
            data_seed=seed,
            use_cpu=not torch.cuda.is_available(),
            dataloader_num_workers=0,
            disable_tqdm=True,
        )
        trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=callbacks)
        trainer.train()
        return [row["loss"] for row in trainer.state.log_history if "loss" in row]


@torch.no_grad()
def eval_loss(model: torch.nn.Module, ids: torch.Tensor, block: int) -> float:
    """Mean next-token loss (nats) over non-overlapping blocks of `ids`."""
    model.eval()
    blocks = CharBlocks(ids, block).blocks
    losses = [model(input_ids=b, labels=b).loss.item() for b in blocks.split(32)]
    return sum(losses) / len(losses)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--attn", default="truthgpt_l1", help="sdpa, eager or truthgpt_<kind>")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--block", type=int, default=64)
    parser.add_argument("--chars", type=int, default=500_000)
    parser.add_argument("--out", default=None, help="save_pretrained folder (optional)")
    args = parser.parse_args()
    tokenizer, train_ids, val_ids, unigram = shakespeare_chars(args.chars)
    model = build_model(llama_config(tokenizer.vocab_size), args.attn)
    losses = train(model, CharBlocks(train_ids, args.block), steps=args.steps)
    val = eval_loss(model, val_ids, args.block)
    print(f"{args.attn}: train loss {losses[0]:.3f} -> {losses[-1]:.3f}, validation {val:.3f}")
    print(f"unigram entropy {unigram:.3f} nats")
    if args.out:
        model.save_pretrained(args.out)
        print(f"saved to {args.out}: reload with use_distance_attention(from_pretrained(...))")


if __name__ == "__main__":
    main()
