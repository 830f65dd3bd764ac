"""Command line: ``splitlora train | eval | score | serve | client | audit | bench | experiment``.

Bad input is a one-line ``error: ...`` on stderr and exit code 2, never a traceback. Every flag of a
config field is generated from its dataclass field (``config.option``) by :mod:`splitlora.flags`: help
text, default, choices, and the ``--help`` section it is listed in.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
import time
from pathlib import Path
from typing import Callable

from . import __version__
from .errors import OneLineParser, UserError, positive_int, run_command
from .flags import GROUP_ORDER, Flag, add_flags, add_group, dataclass_flags, given, metavar

DESCRIPTION = ("Split federated fine-tuning of Hugging Face causal LMs with LoRA (SplitLoRA and its "
               "baselines). Every run writes one standard PEFT adapter of the whole model.")

EXAMPLES = """\
examples:
  splitlora train                                  the default job: SplitLoRA, 3 clients, SmolLM2-135M, synthetic data
  splitlora train --model tiny-gpt2 --steps 20     a quick look (random 4-block model)
  splitlora train --data my.csv --eval --out runs/mine
  splitlora train -c runs/mine/config.yaml --set server_lora.rank=16 --out runs/mine-r16
  splitlora eval --run runs/mine --limit 50
  splitlora serve -c run.yaml --token-file tokens.txt --out runs/served
  splitlora client --server HOST:50051 --client-id alice --token-file alice.token --data alice.csv

Run `splitlora COMMAND --help` for a command's options."""

TRAIN_EXAMPLES = """\
examples:
  splitlora train --model tiny-gpt2 --steps 20 --out runs/quick
  splitlora train --algorithm fed --clients 4 --partition dirichlet:0.5 --data e2e/ --out runs/fed
  splitlora train --split-shape u-shape --tail-layers 1 --clip-norm 100 --out runs/private
  splitlora train -c runs/quick/config.yaml --set prompt_template='Q: {mr}\\nA:' --out runs/q2

--set KEY=VALUE: a number, true/false, null or [a, b] is read as such; any other value is the string
typed, with \\n and \\t read as newline and tab (quote it, e.g. --set 'KEY="8"', to force a string)."""

# What `serve` does not take: the training data is the clients' (each passes its own --data).
CLIENT_DATA_KEYS = ("data", "synthetic_examples", "partition", "partition_key", "data_format.val_data")
# What a run writes into its folder (--overwrite removes these, and nothing else).
RUN_OUTPUTS = ("config.yaml", "metrics.jsonl", "metrics.csv", "adapter", "adapters", "checkpoint", "tensorboard",
               "endpoint", "eval.json", "predictions.txt", "run.json")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions and epilogs as written; every option's default shown (unless its help says it, or
    it has none); reStructuredText/Markdown backticks dropped."""

    def __init__(self, prog: str):
        super().__init__(prog, max_help_position=32, width=min(110, _terminal_width()))

    def _get_help_string(self, action: argparse.Action) -> str:
        text = _plain(action.help or "")
        default = action.default
        shown = not (default is None or default is False or default is argparse.SUPPRESS or default == [])
        if action.option_strings and shown and "default" not in text:
            text += " (default: %(default)s)"
        return text

    def _get_default_metavar_for_optional(self, action: argparse.Action) -> str:
        return metavar(action.option_strings[-1], action.type, None)

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        """A one-line paragraph is wrapped; a paragraph of several lines (examples, tables) is kept as written."""
        import textwrap

        paragraphs = _plain(text).split("\n\n")
        return "\n\n".join(textwrap.fill(par, width, initial_indent=indent, subsequent_indent=indent)
                             if "\n" not in par.strip() else super(HelpFormatter, self)._fill_text(par, width, indent)
                             for par in paragraphs)


def _terminal_width() -> int:
    import shutil

    return shutil.get_terminal_size((100, 20)).columns - 2


def _plain(text: str) -> str:
    return re.sub(r"``?([^`]+)``?", r"\1", text)


def config_flags() -> dict[str, Flag]:
    """``--flag`` -> :class:`~splitlora.flags.Flag` of every flagged field of
    :class:`~splitlora.config.RunConfig` and of the dataclasses nested in it."""
    from .config import RunConfig

    return dataclass_flags(RunConfig)


def _add_config_flags(p: argparse.ArgumentParser, exclude: tuple[str, ...] = ()) -> None:
    """``-c``, ``--set`` and one flag per flagged config field, in sections; ``exclude``: config keys left out."""
    head = add_group(p, "config")
    head.add_argument("-c", "--config", metavar="YAML", help="config file (the format train writes to DIR/config.yaml)")
    head.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="override any config key, e.g. --set client_lora.rank=4 (repeatable; see below)")
    from .privacy.presets import HELP as PRIVACY_HELP

    add_group(p, "privacy").add_argument("--privacy", dest="privacy_preset", default=None, metavar="MODE",
                                         help=PRIVACY_HELP)
    flags = config_flags()
    order = (*GROUP_ORDER, *sorted({f.group for f in flags.values()} - set(GROUP_ORDER)))
    kept = [f for f in flags.values() if not set(f.keys) & set(exclude)]
    add_flags(p, sorted(kept, key=lambda f: order.index(f.group)), negatable=True)


def resolve_config(args: argparse.Namespace):
    """Config file, then ``--set`` items, then explicit flags; validated once at the end."""
    from .config import RunConfig, parse_set, read_yaml

    raw = read_yaml(args.config) if args.config else {}
    cfg = RunConfig.from_dict(raw)
    overrides = {}
    if getattr(args, "privacy_preset", None):  # a preset, then --set and flags over it
        from .privacy.presets import preset

        overrides.update(preset(args.privacy_preset))
    overrides.update(parse_set(args.set))
    overrides.update(given(args, config_flags()))
    return cfg.with_overrides(overrides) if overrides else cfg


def _add_backend_flags(p: argparse.ArgumentParser) -> None:
    """``--backend`` and the Ray flags, from :class:`~splitlora.config.RayOptions`."""
    from .config import RayOptions

    add_flags(p, dataclass_flags(RayOptions).values())


def backend_options(args: argparse.Namespace, cfg):
    """The :class:`~splitlora.config.RayOptions` of ``args``, validated (Ray importable when asked for)."""
    from .config import RayOptions

    opts = RayOptions(**given(args, dataclass_flags(RayOptions))).validate(cfg)
    if opts.ray:
        from .simulation.ray_backend import import_ray

        import_ray()
    return opts


# ---- outputs ---------------------------------------------------------------------------------------

def default_out(command: str) -> Path:
    """A fresh folder per run (as Flower and Lightning do): ``runs/COMMAND-YYYYmmdd-HHMMSS``."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = Path("runs") / f"{command}-{stamp}"
    n = 1
    while out.exists():
        n += 1
        out = Path("runs") / f"{command}-{stamp}-{n}"
    return out


def check_out(out: Path, overwrite: bool, resume: bool = False) -> None:
    """Refuse to write a run into a folder that holds something, unless told to (before any heavy work)."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a folder")
    if resume or not out.is_dir() or not any(out.iterdir()):
        return
    if not overwrite:
        raise UserError(f"--out {out} is not empty (a previous run?): choose another --out, or pass --overwrite "
                        f"to replace its run outputs")


def clear_outputs(out: Path) -> None:
    """Remove what an earlier run wrote in ``out`` (and only that: other files stay)."""
    import shutil

    for name in RUN_OUTPUTS:
        path = out / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()


def _add_output_flags(p: argparse.ArgumentParser, command: str, resume: bool = False) -> None:
    group = add_group(p, "outputs")
    group.add_argument("--out", type=Path, default=None, metavar="DIR",
                       help=f"output folder; it must be empty or new unless --overwrite"
                            f"{' or --resume' if resume else ''} (default: a new runs/{command}-DATE-TIME)")
    group.add_argument("--overwrite", action="store_true", help="replace the run outputs of a non-empty --out")
    group.add_argument("--quiet", action="store_true", help="no progress bar")


def prepare_out(args: argparse.Namespace, command: str, resume: bool = False) -> Path:
    """``args.out`` (or a fresh default), checked; says where the run writes."""
    out = args.out if args.out is not None else default_out(command)
    check_out(out, args.overwrite, resume)
    return out


def announce(out: Path, resume: bool = False) -> None:
    """Clear an overwritten run's outputs and say where this one writes."""
    if resume:
        print(f"{'resuming' if (out / 'checkpoint').exists() else 'writing'} run in {out}", flush=True)
        return
    if out.is_dir() and any(out.iterdir()):
        clear_outputs(out)
    print(f"writing run to {out}", flush=True)


def record_command(out: Path, command: str) -> None:
    """``DIR/run.json``: which command wrote the run (``eval`` reads it: a served run's data stayed with its
    clients). Written once the run has started (it has a config.yaml), so a run that failed before leaves
    its folder empty for the retry."""
    import json

    if (out / "config.yaml").is_file():
        (out / "run.json").write_text(json.dumps({"command": command, "splitlora": __version__}) + "\n")


def cmd_train(args: argparse.Namespace) -> int:
    from .checks import check_before_loading

    cfg = resolve_config(args)
    opts = backend_options(args, cfg)
    out = prepare_out(args, "train")
    check_before_loading(cfg)
    announce(out)
    from .simulation.run import train

    try:
        result = train(cfg, out, progress=not args.quiet, backend=opts)
    finally:
        record_command(out, "train")
    val = f"{result.val_loss:.4f}" if result.val_loss is not None else "n/a"
    print(f"{cfg.algorithm}: loss {result.first_loss:.4f} -> {result.last_loss:.4f}, val loss {val}, "
          f"{result.tokens} tokens in {result.seconds:.1f}s ({result.tokens / max(result.seconds, 1e-9):.0f} tok/s), "
          f"bytes up {result.bytes_up:,} down {result.bytes_down:,}")
    print(f"adapter: {result.adapter_dir}")
    if args.eval:
        from .eval.generate import evaluate_run

        evaluate_run(out, data=None, split="test", limit=args.eval_limit, beams=args.beams,
                     progress=not args.quiet)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="splitlora", description=DESCRIPTION, epilog=EXAMPLES, formatter_class=HelpFormatter)
    parser.add_argument("--version", action="version", version=f"splitlora {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", parser_class=OneLineParser, title="commands", metavar="COMMAND")

    p = sub.add_parser("train", help="train with one of the four algorithms (in one process, or on a Ray cluster)",
                       description="Train in this process (or on a Ray cluster): every party of the run, one "
                                   "adapter at the end. Flags override -c's file, which overrides the defaults.",
                       epilog=TRAIN_EXAMPLES)
    _add_config_flags(p)
    _add_output_flags(p, "train")
    group = add_group(p, "evaluation")
    group.add_argument("--eval", action="store_true", help="run splitlora eval on the result")
    group.add_argument("--eval-limit", type=positive_int, default=None, metavar="N", help="with --eval: first N MRs only")
    group.add_argument("--beams", type=positive_int, default=10, metavar="N", help="with --eval: beam size (1 = greedy)")
    _add_backend_flags(p)
    p.set_defaults(func=cmd_train)

    for register in _EXTRA_COMMANDS:
        register(sub)
    for name, sp in sub.choices.items():
        sp.formatter_class = HelpFormatter
        sp.prog = f"splitlora {name}"
    return parser


# Other modules add their subcommands here (eval, score, serve, client, bench, experiment).
_EXTRA_COMMANDS: list[Callable] = []


def _register_optional() -> None:
    import importlib

    for module in ("splitlora.eval.cli", "splitlora.transport.cli", "splitlora.privacy.cli", "splitlora.bench_cli",
                   "splitlora.experiments.cli", "splitlora.export_cli"):
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise
            continue
        if mod.register not in _EXTRA_COMMANDS:
            _EXTRA_COMMANDS.append(mod.register)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _register_optional()
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv:
        parser.print_help()
        return 0
    if argv[0] not in {"-h", "--help", "-v", "--verbose", "--version"} and argv[0].startswith("-"):
        argv = ["train", *argv]  # flags alone are train's
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    # bitsandbytes' CPU backend (imported by peft whenever it is installed) warns at import that it could not
    # fetch an optional kernel from the hub; it computes with its own code then, and we run offline.
    for name in ("bitsandbytes.backends.cpu.ops", "kernels"):
        logging.getLogger(name).setLevel(logging.ERROR)
    if args.command is None:
        parser.print_help()
        return 0
    return run_command(args.func, args, "finished work was saved")


if __name__ == "__main__":
    sys.exit(main())
