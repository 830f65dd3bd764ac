"""``splitlora eval`` (decode and score a run) and ``splitlora score`` (score an existing output file)."""

from __future__ import annotations

import argparse
import json

from ..errors import positive_int

EVAL_HELP = """\
Decode one output per distinct MR with the run's base model and DIR/adapter (beam search, length
penalty 0.8, no repeated 4-grams), then write DIR/predictions.txt (one line per MR, in order) and
DIR/eval.json (BLEU, NIST, METEOR, ROUGE-L, CIDEr, counts, timing). Prompts are decoded in
batches of similar length (outputs in input order; the same outputs as unsorted batches).

The perplexity of the references is off by default: it scores every reference row (4,693 on the
E2E test set), about three times the time of greedy decoding of the 630 MRs on a CPU. --perplexity
turns it on; off, eval.json holds "perplexity": null and "perplexity_note" says why.

Which data: --data, else the run's config.yaml `data`.
  synthetic      the run's synthetic set is regenerated; its validation MRs are the test set
                 (whatever --split says)
  a folder       its --split file: test -> testset_w_refs.csv, dev -> devset.csv
  a file         --data FILE is used as is; the run's own data file (its training file) is
                 replaced by the --split file next to it, else by the MRs the run held out of
                 it (val_fraction), which it never trained on
  a served run   its data stayed with its clients: --data is needed
References are grouped by consecutive identical MR, as the official E2E scripts do (630 MRs on
the E2E test set).

Your own rows (--data test.jsonl, .json, .parquet, a non-E2E CSV, a folder or save_to_disk folder;
default: the run's --val-data): every row's prompt is decoded (a conversation up to its last
assistant turn, through the chat template), DIR/predictions.jsonl gets {prompt, reference,
prediction} per row before scoring, and DIR/eval.json holds loss and perplexity of the references,
sacreBLEU, ROUGE-L F1 and exact match.
"""


def cmd_eval(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..errors import UserError
    from .generate import evaluate_run

    info = Path(args.run) / "run.json"
    if args.data is None and info.is_file() and json.loads(info.read_text()).get("command") == "serve":
        raise UserError(f"{args.run} is a served run: its training data stayed with its clients (the server's "
                        f"config.yaml does not name it): pass --data with test rows (a CSV with mr and ref "
                        f"columns, or an E2E folder)")
    evaluate_run(args.run, data=args.data, split=args.split, limit=args.limit, beams=args.beams,
                 progress=not args.quiet, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                 device=args.device, perplexity=args.perplexity)
    return 0


def cmd_score(args: argparse.Namespace) -> int:
    from .metrics import score_files

    print(json.dumps(score_files(args.refs, args.hyp)))
    return 0


def register(sub) -> None:
    """Add ``eval`` and ``score`` to the ``splitlora`` subcommands (its parsers give one-line errors)."""
    p = sub.add_parser("eval", help="decode the test MRs with a run's adapter and score them",
                       description=EVAL_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, metavar="DIR", help="a run folder written by `splitlora train`")
    p.add_argument("--data", default=None, metavar="PATH",
                   help="'synthetic', an E2E CSV file or folder, or your own rows (.jsonl, .json, .csv, .parquet, "
                        "a folder) (default: the run's data)")
    p.add_argument("--split", default="test", choices=("test", "dev"),
                   help="with a data folder: test = testset_w_refs.csv, dev = devset.csv (default: test)")
    p.add_argument("--limit", type=positive_int, default=None, metavar="N", help="first N distinct MRs (or rows) only")
    p.add_argument("--beams", type=positive_int, default=10, help="beam size, 1 = greedy (default: 10)")
    p.add_argument("--max-new-tokens", type=positive_int, default=64, help="output length cap (default: 64)")
    p.add_argument("--batch-size", type=positive_int, default=8, help="MRs decoded together (default: 8)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N or auto (default: the run's device)")
    p.add_argument("--perplexity", action="store_true",
                   help="also the perplexity of every reference row (off by default: ~3x the greedy decoding time)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("score", help="score an output file against E2E references (prints JSON)",
                       description="Score HYP (one output line per distinct MR, in order) against the "
                                   "references of an E2E CSV (columns mr, ref), as the official E2E "
                                   "script does. Prints {\"bleu\", \"nist\", \"meteor\", \"rouge_l\", "
                                   "\"cider\", \"n\"}; METEOR is null without Java.")
    p.add_argument("--refs", required=True, metavar="CSV", help="E2E CSV with mr and ref columns")
    p.add_argument("--hyp", required=True, metavar="TXT", help="system outputs, one line per MR")
    p.set_defaults(func=cmd_score)
