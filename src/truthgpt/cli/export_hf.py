"""`truthgpt export-hf`: write a run as a folder Hugging Face transformers loads."""

from __future__ import annotations

import argparse
import sys


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "export-hf",
        help="export a run for transformers' AutoModelForCausalLM / AutoTokenizer",
        description="Write the model (and tokenizer) of a run or checkpoint as a Hugging Face "
        "folder, with the model's code: load it where only torch and transformers are "
        "installed with AutoModelForCausalLM.from_pretrained(OUT_DIR, trust_remote_code=True). "
        "Needs transformers (pip install 'truthgpt[hf]').",
    )
    # --run/--out like every other command; the positional form of release 0.1 still works.
    p.add_argument("--run", help="run folder (its latest checkpoint) or checkpoint")
    p.add_argument("--out", help="folder to write; must be new or empty")
    p.add_argument("run_pos", nargs="?", metavar="RUN_DIR", help=argparse.SUPPRESS)
    p.add_argument("out_pos", nargs="?", metavar="OUT_DIR", help=argparse.SUPPRESS)
    p.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it has files")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    args.run = args.run or args.run_pos
    args.out = args.out or args.out_pos
    if not args.run or not args.out:
        raise ValueError("export-hf: --run RUN_DIR and --out OUT_DIR are required")
    try:
        from truthgpt.workflows.hf import export_hf
    except ImportError as err:
        print(f"truthgpt export-hf: error: {err}", file=sys.stderr)
        return 2
    out = export_hf(args.run, args.out, overwrite=args.overwrite)
    print(f"exported {args.run} to {out}")
    if (out / "modeling_truthgpt.py").exists():
        how = f"AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True)"
    else:  # a kind added with register_distance: its code is the user's
        how = f"import truthgpt.hf; AutoModelForCausalLM.from_pretrained({str(out)!r})"
    print(f"load it with: from transformers import AutoModelForCausalLM; {how}")
    return 0
