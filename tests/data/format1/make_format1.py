"""Wrote tests/data/format1 with truthgpt 0.1.0 (checkpoint format 1, import paths of that
release); kept to show how the stored checkpoint and its expected values were made."""

import json
import shutil
import sys
from pathlib import Path

import torch

from truthgpt.checkpoint import load_core
from truthgpt.config import TruthGPTOptimizationCoreConfig
from truthgpt.data import build_tokenizer
from truthgpt.training.core import TruthGPTOptimizationCore

out = Path(sys.argv[1])
shutil.rmtree(out, ignore_errors=True)
out.mkdir(parents=True)
text = "to be or not to be, that is the question"
tok = build_tokenizer("char", text)
cfg = TruthGPTOptimizationCoreConfig(
    vocab_size=tok.vocab_size,
    hidden_size=16,
    num_attention_heads=2,
    num_hidden_layers=1,
    max_position_embeddings=16,
    block_size=8,
    batch_size=2,
    distance_type="l1",
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
    warmup_steps=1,
    max_steps=10,
    seed=3,
    device="cpu",
)
core = TruthGPTOptimizationCore(cfg, tokenizer=tok, chars_per_token=1.0)
ids = torch.tensor([tok.encode(text)[:16]])


def batch(i):
    x = ids[:, i : i + 9].repeat(2, 1)
    return {"input_ids": x, "labels": x}


for i in range(3):
    core.train_step(batch(i))
core.record_eval({"loss": 2.75})
core.save_checkpoint(out / "ckpt", note="format 1")
x = ids[:, :8]
resumed = load_core(out / "ckpt")
expected = {
    "logits": resumed.raw_model(x).logits[0, :, :4].tolist(),
    "next_losses": [resumed.train_step(batch(i))["loss"] for i in (3, 4)],
    "input_ids": x.tolist(),
    "step": 3,
}
(out / "expected.json").write_text(json.dumps(expected, indent=1) + "\n")
