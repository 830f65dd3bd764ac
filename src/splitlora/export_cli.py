"""``splitlora export``: registered by ``splitlora.cli`` when this module is present."""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    p = subparsers.add_parser("export", help="save a run's base model with its adapter merged in (a plain HF model)")
    p.add_argument("--run", required=True, help="the run's output folder (holds config.yaml and adapter/)")
    p.add_argument("--merge", required=True, metavar="OUT", help="new folder for the merged model and its tokenizer")
    p.add_argument("--dtype", default=None, help="dtype of the saved weights: fp32, bf16 or fp16 (default: the run's)")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from .models.export import export_merged

    out = export_merged(args.run, args.merge, args.dtype)
    print(f"merged model: {out}")
    return 0
