"""`truthgpt generate`: continue a prompt with a trained run, streaming text as it is produced."""

from __future__ import annotations

import argparse
import re
import sys

_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "generate",
        help="sample text from a run, streamed to the terminal",
        description="Continue --prompt with a run's latest checkpoint (or a given checkpoint "
        "folder), printing the text as it is produced.",
    )
    p.add_argument("--run", required=True, metavar="RUN_DIR", help="run or checkpoint folder")
    p.add_argument("--prompt", required=True, metavar="TEXT", help="text to continue")
    p.add_argument(
        "--max-new-tokens",
        type=int,
        default=200,
        metavar="N",
        help="default 200, at most 1,000,000",
    )
    p.add_argument(
        "--temperature", type=float, default=1.0, metavar="T", help="default 1.0; 0 is greedy"
    )
    p.add_argument("--top-k", type=int, metavar="K", help="sample from the K likeliest tokens")
    p.add_argument(
        "--top-p", type=float, metavar="P", help="sample from the nucleus of probability P"
    )
    p.add_argument("--seed", type=int, metavar="S", help="seed for a reproducible sample")
    p.add_argument("--greedy", action="store_true", help="always take the likeliest token")
    p.add_argument(
        "--no-cache", action="store_true", help="recompute the context at every token (slow)"
    )
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from truthgpt.core.generation import TextStreamer, check_sampling_args
    from truthgpt.io import resolve_checkpoint
    from truthgpt.nn.model import TruthGPTModel
    from truthgpt.training.checkpoint import read_tokenizer
    from truthgpt.training.hardware import resolve_device

    # Check everything the user typed before loading anything, naming the flag.
    try:
        check_sampling_args(args.temperature, args.top_k, args.top_p, args.max_new_tokens)
    except ValueError as err:
        field, _, message = str(err).partition(":")
        raise ValueError(f"--{field.replace('_', '-')}:{message}") from None
    if not _DEVICE.match(args.device):
        raise ValueError(f"--device: expected auto, cpu, cuda or cuda:N, got {args.device!r}")
    if args.prompt == "":
        raise ValueError("--prompt: empty; the model needs at least one token to continue")
    device = resolve_device(args.device)

    folder = resolve_checkpoint(args.run)  # resolved once, so model and tokenizer match
    tokenizer = read_tokenizer(folder)
    if tokenizer is None:
        raise ValueError(
            f"--run: {folder} holds no tokenizer.json, so the prompt cannot be encoded; "
            "use a run or checkpoint folder written by training"
        )
    model = TruthGPTModel.from_pretrained(folder, map_location=device)
    if tokenizer.vocab_size != model.config.vocab_size:
        raise ValueError(
            f"--run: the tokenizer has {tokenizer.vocab_size} tokens but the model's "
            f"vocab_size is {model.config.vocab_size}"
        )
    try:
        ids = tokenizer.encode(args.prompt)
    except ValueError as err:
        raise ValueError(f"--prompt: {err}") from None
    if not ids:
        raise ValueError("--prompt: encodes to no tokens; the model needs at least one")

    sys.stdout.write(args.prompt)
    sys.stdout.flush()
    model.generate(
        torch.tensor([ids]),
        args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        do_sample=not args.greedy,
        seed=args.seed,
        streamer=TextStreamer(tokenizer.decode, file=sys.stdout),
        use_cache=not args.no_cache,
    )
    return 0
