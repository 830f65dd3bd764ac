"""``splitlora serve`` and ``splitlora client``: the deployment commands (see docs/deployment.md).

Their flags come from :class:`~splitlora.config.ServeOptions` and :class:`~splitlora.config.ClientOptions`
(help text included); the run itself is configured as for ``splitlora train``.
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

from ..config import ClientOptions, ServeOptions, help_of
from ..errors import UserError
from ..flags import add_flags, add_group, dataclass_flags, given


SERVE_HELP = """\
Run the server side of a run over gRPC: the main server (the blocks after the cut and the head) and
the aggregator (FedAvg of the client adapters). Clients join with splitlora client, each with its own
data; the server never sees their files. The run (algorithm, model, cut, steps, LoRA...) is
configured as for splitlora train, except for the data. Writes config.yaml, metrics, checkpoints and
the adapter to --out. See docs/deployment.md."""


def register(sub) -> None:
    from ..cli import CLIENT_DATA_KEYS, _add_config_flags, _add_output_flags

    p = sub.add_parser("serve", help="run the algorithm's server side (main server and aggregator) over gRPC",
                       description=SERVE_HELP)
    _add_config_flags(p, exclude=CLIENT_DATA_KEYS)
    _add_output_flags(p, "serve", resume=True)
    group = add_group(p, "deployment")
    add_flags(p, dataclass_flags(ServeOptions).values())
    group.add_argument("--token-file", required=True, metavar="FILE", help="one 'NAME TOKEN' line per client; the "
                                                                           "order fixes each client's index")
    group.add_argument("--tls-cert", metavar="PEM", help=help_of(ServeOptions, "tls_cert"))
    group.add_argument("--tls-key", metavar="PEM", help=help_of(ServeOptions, "tls_key"))
    group.add_argument("--max-message-mb", type=float, default=512.0, metavar="MB",
                       help="refuse larger messages (they are also checked against the sizes the config implies)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("client", help="join a `splitlora serve` run as one data owner")
    add_flags(p, dataclass_flags(ClientOptions).values(), sections=False)
    p.add_argument("--token-file", required=True, metavar="FILE", help="file holding this client's token")
    p.add_argument("--tls-ca", metavar="PEM", help=help_of(ClientOptions, "tls_ca"))
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_client)


def _address(value: str, flag: str) -> str:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise UserError(f"{flag} must be HOST:PORT (got {value!r})")
    return value


def _pem(path: str | None, flag: str) -> bytes | None:
    if path is None:
        return None
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{flag}: file not found: {path}")
    data = p.read_bytes()
    if b"-----BEGIN" not in data:
        raise UserError(f"{flag}: {path} is not a PEM file")
    return data


def _options(cls, args: argparse.Namespace, **extra):
    """``cls`` from the flags given (the others keep their defaults) and ``extra``."""
    return cls(**{**given(args, dataclass_flags(cls)), **extra})


def cmd_serve(args: argparse.Namespace) -> int:
    from ..cli import resolve_config
    from .auth import read_token_file
    from .serve import serve

    from ..checks import check_before_loading
    from ..cli import announce, prepare_out, record_command

    cfg = resolve_config(args)
    if args.max_message_mb <= 0:
        raise UserError("--max-message-mb must be > 0")
    out = prepare_out(args, "serve", resume=bool(args.resume))
    opts = _options(ServeOptions, args, tokens=read_token_file(args.token_file),
                    tls_cert=_pem(args.tls_cert, "--tls-cert"),
                    tls_key=_pem(args.tls_key, "--tls-key"), max_message_bytes=int(args.max_message_mb * (1 << 20)),
                    progress=not args.quiet)
    opts = replace(opts, listen=_address(opts.listen, "--listen"))
    check_before_loading(cfg, data="synthetic")  # the data is the clients'
    announce(out, resume=opts.resume)
    try:
        r = serve(cfg, opts, out)
    finally:
        record_command(out, "serve")
    first = f"{r.first_loss:.4f}" if r.first_loss is not None else "n/a"
    last = f"{r.last_loss:.4f}" if r.last_loss is not None else "n/a"
    print(f"serve: loss {first} -> {last}, {r.tokens} tokens in {r.seconds:.1f}s "
          f"({r.tokens / max(r.seconds, 1e-9):.0f} tok/s), bytes up {r.bytes_up:,} down {r.bytes_down:,} "
          f"(on the wire {r.wire_bytes_up:,} / {r.wire_bytes_down:,})")
    print(f"adapter: {r.adapter_dir}")
    return 0


def cmd_client(args: argparse.Namespace) -> int:
    from ..device import return_freed_memory
    from .auth import read_client_token
    from .remote_client import run_client

    return_freed_memory()  # the data owner's device is the one short of memory

    if not Path(args.data).exists():
        raise UserError(f"data file not found: {args.data}")
    opts = _options(ClientOptions, args, server=_address(args.server, "--server"),
                    token=read_client_token(args.token_file), tls_ca=_pem(args.tls_ca, "--tls-ca"),
                    progress=not args.quiet)
    r = run_client(opts)
    print(f"client {r.name}: {'finished' if r.finished else 'stopped'} after {r.steps} local steps, "
          f"{r.tokens} tokens, bytes up {r.bytes_up:,} down {r.bytes_down:,}")
    return 0
