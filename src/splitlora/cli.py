"""Command line: ``splitlora train | eval | score | serve | client | audit | bench``.

Bad input is a one-line ``error: ...`` on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Callable

from .errors import OneLineParser, run_command

def config_flags() -> dict[str, tuple[str, type, str]]:
    """``--flag`` -> (config key, type, help) for every config field that has a flag. A flag of
    ``LoraSide`` sets both sides (``client_lora`` and ``server_lora``)."""
    import dataclasses
    import typing

    from .config import Aggregation, LoraSide, Privacy, RunConfig

    out: dict[str, tuple[str, type, str]] = {}
    for cls, prefix in ((RunConfig, ""), (LoraSide, "*lora."), (Privacy, "privacy."), (Aggregation, "aggregation.")):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            flag = f.metadata.get("flag")
            if flag:
                typ = hints[f.name]
                typ = next((a for a in typing.get_args(typ) if a is not type(None)), typ)
                out[flag] = (prefix + f.name, typ, f.metadata.get("help", ""))
    return out


def _add_config_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("-c", "--config", help="YAML config (the format train writes to DIR/config.yaml)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config key, e.g. --set client_lora.rank=4 (repeatable)")
    from .privacy.presets import HELP as PRIVACY_HELP

    p.add_argument("--privacy", dest="privacy_preset", default=None, metavar="MODE", help=PRIVACY_HELP)
    for flag, (key, typ, text) in config_flags().items():
        where = "both sides' LoRA: " if key.startswith("*lora.") else ""
        shown = f"{where}{text} [{key.replace('*lora', 'client_lora/server_lora')}]"
        if typ is bool:  # a switch: present means true (argparse's bool("false") would be True)
            p.add_argument(flag, action="store_const", const=True, default=None, help=shown)
        else:
            p.add_argument(flag, type=typ, default=None, help=shown)


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
    for flag, (key, _, _) in config_flags().items():
        value = getattr(args, flag.lstrip("-").replace("-", "_"))
        if value is None:
            continue
        if key.startswith("*lora."):
            overrides[f"client_lora.{key[6:]}"] = value
            overrides[f"server_lora.{key[6:]}"] = value
        else:
            overrides[key] = value
    return cfg.with_overrides(overrides) if overrides else cfg


def _add_backend_flags(p: argparse.ArgumentParser) -> None:
    """``--backend`` and the Ray flags, from :class:`~splitlora.config.RayOptions`."""
    import dataclasses
    import typing

    from .config import RayOptions

    hints = typing.get_type_hints(RayOptions)
    for f in dataclasses.fields(RayOptions):
        if f.metadata.get("flag"):
            typ = next((a for a in typing.get_args(hints[f.name]) if a is not type(None)), hints[f.name])
            p.add_argument(f.metadata["flag"], dest=f"ray_{f.name}", type=typ, default=f.default,
                           help=f"{f.metadata['help']} (default {f.default})")


def backend_options(args: argparse.Namespace, cfg):
    """The :class:`~splitlora.config.RayOptions` of ``args``, validated (Ray importable when asked for)."""
    import dataclasses

    from .config import RayOptions

    opts = RayOptions(**{f.name: getattr(args, f"ray_{f.name}") for f in dataclasses.fields(RayOptions)
                         if f.metadata.get("flag")}).validate(cfg)
    if opts.ray:
        from .transport.ray_backend import import_ray

        import_ray()
    return opts


def cmd_train(args: argparse.Namespace) -> int:
    from .train import train

    cfg = resolve_config(args)
    opts = backend_options(args, cfg)
    result = train(cfg, args.out, progress=not args.quiet, backend=opts)
    val = f"{result.val_loss:.4f}" if result.val_loss is not None else "n/a"
    print(f"{cfg.algorithm}: loss {result.first_loss:.4f} -> {result.last_loss:.4f}, val loss {val}, "
          f"{result.tokens} tokens in {result.seconds:.1f}s ({result.tokens / max(result.seconds, 1e-9):.0f} tok/s), "
          f"bytes up {result.bytes_up:,} down {result.bytes_down:,}")
    print(f"adapter: {result.adapter_dir}")
    if args.eval:
        from .eval.generate import evaluate_run

        evaluate_run(args.out, data=None, split="test", limit=args.eval_limit, beams=args.beams,
                     progress=not args.quiet)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="splitlora", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", parser_class=OneLineParser)

    p = sub.add_parser("train", help="train with one of the four algorithms (in one process, or on a Ray cluster)")
    _add_config_flags(p)
    _add_backend_flags(p)
    p.add_argument("--out", default="runs/latest", help="output folder (default: runs/latest)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--eval", action="store_true", help="run `splitlora eval` on the result")
    p.add_argument("--eval-limit", type=int, default=None, help="with --eval: first N MRs only")
    p.add_argument("--beams", type=int, default=10, help="with --eval: beam size (1 = greedy)")
    p.set_defaults(func=cmd_train)

    for register in _EXTRA_COMMANDS:
        register(sub)
    return parser


# Other modules add their subcommands here (eval, score, serve, client, bench).
_EXTRA_COMMANDS: list[Callable] = []


def _register_optional() -> None:
    import importlib

    for module in ("splitlora.eval.cli", "splitlora.transport.cli", "splitlora.privacy.cli", "splitlora.bench_cli"):
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
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        argv = ["train"]
    elif argv[0] not in {"-h", "--help", "-v", "--verbose"} and argv[0].startswith("-"):
        argv = ["train", *argv]
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if args.command is None:
        args = parser.parse_args(["train", *argv])
    return run_command(args.func, args, "finished work was saved")


if __name__ == "__main__":
    sys.exit(main())
