"""``splitlora serve`` and ``splitlora client``: the deployment commands (see docs/deployment.md)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import UserError


def register(sub) -> None:
    from ..cli import _add_config_flags

    p = sub.add_parser("serve", help="run the main server and the aggregator over gRPC")
    _add_config_flags(p)
    p.add_argument("--listen", default="127.0.0.1:50051", metavar="HOST:PORT",
                   help="address to listen on (default 127.0.0.1:50051; port 0 = any free port)")
    p.add_argument("--token-file", required=True, metavar="F", help="one 'CLIENT_ID TOKEN' pair per line")
    p.add_argument("--tls-cert", metavar="C", help="PEM certificate (with --tls-key: serve over TLS)")
    p.add_argument("--tls-key", metavar="K", help="PEM private key of --tls-cert")
    p.add_argument("--out", default="runs/serve", help="output folder (default: runs/serve)")
    p.add_argument("--resume", action="store_true", help="continue from DIR/checkpoint after a crash or stop")
    p.add_argument("--min-clients", type=int, default=1,
                   help="fewest clients a step or an aggregation goes ahead with (default 1)")
    p.add_argument("--client-timeout", type=float, default=120.0, metavar="S",
                   help="drop a client that takes longer than S seconds to send its step or adapter (default 120)")
    p.add_argument("--join-timeout", type=float, default=None, metavar="S",
                   help="give up when too few clients have joined after S seconds (default: wait)")
    p.add_argument("--checkpoint-every", type=int, default=0, metavar="N",
                   help="checkpoint after the round that completes N more steps (default 0: every round)")
    p.add_argument("--max-message-mb", type=float, default=512.0,
                   help="refuse larger messages (default 512; activations and adapters are also checked "
                        "against the sizes the config implies)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("client", help="join a `splitlora serve` run as one data owner")
    p.add_argument("--server", required=True, metavar="HOST:PORT", help="the server's address")
    p.add_argument("--token-file", required=True, metavar="F", help="file holding this client's token")
    p.add_argument("--client-id", required=True, type=int, metavar="ID", help="this client's id (an integer)")
    p.add_argument("--data", required=True, metavar="PATH",
                   help="E2E CSV file (or folder of them): this client's training data")
    p.add_argument("--tls-ca", metavar="CA", help="PEM of the CA that signed the server certificate (enables TLS)")
    p.add_argument("--reconnect-timeout", type=float, default=300.0, metavar="S",
                   help="keep trying to reach the server for S seconds (default 300)")
    p.add_argument("--device", default=None,
                   help="cpu, cuda, cuda:N or auto (default: the run's device if this machine has it, else cpu)")
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


def cmd_serve(args: argparse.Namespace) -> int:
    from ..cli import resolve_config
    from .grpc_server import ServeOptions, read_token_file, serve

    cfg = resolve_config(args)
    if args.max_message_mb <= 0:
        raise UserError("--max-message-mb must be > 0")
    opts = ServeOptions(tokens=read_token_file(args.token_file), listen=_address(args.listen, "--listen"),
                        tls_cert=_pem(args.tls_cert, "--tls-cert"), tls_key=_pem(args.tls_key, "--tls-key"),
                        min_clients=args.min_clients, client_timeout=args.client_timeout,
                        join_timeout=args.join_timeout, checkpoint_every=args.checkpoint_every,
                        resume=args.resume, max_message_bytes=int(args.max_message_mb * (1 << 20)),
                        progress=not args.quiet)
    r = serve(cfg, opts, args.out)
    print(f"serve: loss {r.first_loss:.4f} -> {r.last_loss:.4f}, {r.tokens} tokens in {r.seconds:.1f}s "
          f"({r.tokens / max(r.seconds, 1e-9):.0f} tok/s), bytes up {r.bytes_up:,} down {r.bytes_down:,} "
          f"(on the wire {r.wire_bytes_up:,} / {r.wire_bytes_down:,})")
    print(f"adapter: {r.adapter_dir}")
    return 0


def cmd_client(args: argparse.Namespace) -> int:
    from .grpc_client import ClientOptions, read_client_token, run_client

    if not Path(args.data).exists():
        raise UserError(f"data file not found: {args.data}")
    opts = ClientOptions(server=_address(args.server, "--server"), client_id=args.client_id,
                         token=read_client_token(args.token_file), data=args.data,
                         tls_ca=_pem(args.tls_ca, "--tls-ca"), reconnect_timeout=args.reconnect_timeout,
                         progress=not args.quiet, device=args.device)
    r = run_client(opts)
    print(f"client {r.client_id}: {'finished' if r.finished else 'stopped'} after {r.steps} local steps, "
          f"{r.tokens} tokens, bytes up {r.bytes_up:,} down {r.bytes_down:,}")
    return 0
