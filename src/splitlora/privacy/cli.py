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

With --canaries N it runs the canary audit of the released adapter instead (The Secret Sharer):
N random record numbers are planted --canary-repeats times in client 0's data, the config is
trained, and each canary is ranked under the saved adapter against --canary-candidates random
ones (rank 1: memorised). Run it with and without --dp-clip/--dp-noise to see what DP-SGD buys.
Writes OUT/canary.json and OUT/run/.
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
    p.add_argument("--canaries", type=int, default=0, help="run the canary audit with this many canaries (0: the "
                                                           "activation attacks instead)")
    p.add_argument("--canary-repeats", type=int, default=4, help="copies of each canary in client 0's data")
    p.add_argument("--canary-candidates", type=int, default=1000, help="random secrets each canary is ranked against")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_audit)


def cmd_audit(args: argparse.Namespace) -> int:
    from ..cli import resolve_config
    from ..errors import UserError
    from .audit import AuditOptions, format_row, run_audit

    cfg = resolve_config(args)
    if args.canaries:
        from .canary import CanaryOptions, format_canaries, run_canary_audit

        if args.canaries < 0 or args.canary_repeats < 1 or args.canary_candidates < 1:
            raise UserError("--canaries must be >= 0, --canary-repeats and --canary-candidates >= 1")
        result = run_canary_audit(cfg, args.out, CanaryOptions(canaries=args.canaries, repeats=args.canary_repeats,
                                                                candidates=args.canary_candidates),
                                  progress=not args.quiet)
        print(format_canaries(result))
        print(f"canary audit: {args.out}/canary.json")
        return 0
    for name in ("max_batches", "attacker_examples", "bleu_mrs"):
        if getattr(args, name) < (0 if name == "bleu_mrs" else 1):
            raise UserError(f"--{name.replace('_', '-')} must be >= {0 if name == 'bleu_mrs' else 1}")
    opts = AuditOptions(max_batches=args.max_batches, attacker_data=args.attacker_data,
                        attacker_examples=args.attacker_examples, bleu_mrs=args.bleu_mrs, eval_data=args.eval_data)
    row = run_audit(cfg, args.out, opts, progress=not args.quiet)
    print(format_row(row))
    print(f"audit: {args.out}/audit.json")
    return 0
