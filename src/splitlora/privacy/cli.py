"""``splitlora audit``: what a config leaks to its server, measured by attacking its own traffic."""

from __future__ import annotations

import argparse

HELP = """\
Train the config in this process, record what its server receives, and attack it as an
honest-but-curious server that knows the pretrained weights, the tokenizer and the config:
input reconstruction from the activations (least squares and a learned inverter, trained on the
attacker's own text), label reconstruction (two-part: the labels are in the message; U-shape: from
the gradients the clients send), beside the utility (validation loss, BLEU on test MRs) and the
(epsilon, delta) of the noise. Writes OUT/audit.json and OUT/run/ (the trained run).
"""


def register(sub) -> None:
    from ..cli import _add_config_flags

    p = sub.add_parser("audit", help="measure what a config leaks to its server (attacks on its own traffic)",
                       description=HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_config_flags(p)
    p.add_argument("--out", default="runs/audit", help="output folder (default: runs/audit)")
    p.add_argument("--attacker-data", default=None, metavar="PATH",
                   help="the attacker's own public text: an E2E CSV or folder, or 'synthetic' (default), "
                        "never the victims' training data")
    p.add_argument("--max-batches", type=int, default=6, help="batches per client recorded, spread over the run")
    p.add_argument("--attacker-examples", type=int, default=1500, help="attacker examples for input reconstruction")
    p.add_argument("--bleu-mrs", type=int, default=100, help="test MRs decoded (greedy) for BLEU; 0 = skip")
    p.add_argument("--eval-data", default=None, metavar="PATH",
                   help="where the test MRs come from (default: as `splitlora eval` finds them)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_audit)


def cmd_audit(args: argparse.Namespace) -> int:
    from ..cli import resolve_config
    from ..errors import UserError
    from .audit import AuditOptions, format_row, run_audit

    cfg = resolve_config(args)
    for name in ("max_batches", "attacker_examples", "bleu_mrs"):
        if getattr(args, name) < (0 if name == "bleu_mrs" else 1):
            raise UserError(f"--{name.replace('_', '-')} must be >= {0 if name == 'bleu_mrs' else 1}")
    opts = AuditOptions(max_batches=args.max_batches, attacker_data=args.attacker_data,
                        attacker_examples=args.attacker_examples, bleu_mrs=args.bleu_mrs, eval_data=args.eval_data)
    row = run_audit(cfg, args.out, opts, progress=not args.quiet)
    print(format_row(row))
    print(f"audit: {args.out}/audit.json")
    return 0
