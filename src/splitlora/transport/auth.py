"""Who may call the server: token files, the bearer-token interceptor, and log-safe text.

A token file holds one ``NAME TOKEN`` line per client; its order fixes each client's index (the
seed of its data order), so a run stays reproducible. Names are 1 to 64 letters, digits, ``.``,
``_`` or ``-`` (integers are names too). Tokens are 16 to 512 printable ASCII characters.

Every call carries ``authorization: Bearer <token>`` and ``splitlora-client-id: <name>``;
:class:`TokenInterceptor` checks them before any handler runs, with one constant-time comparison
per call (also for unknown names, so timing tells nothing), and refuses the call with
UNAUTHENTICATED otherwise. Tokens never reach a log.
"""

from __future__ import annotations

import hmac
import logging
import re
import secrets
from pathlib import Path

import grpc

from ..config import check_client_name
from ..errors import UserError
from .throttle import Throttled


log = logging.getLogger("splitlora.transport.server")

AUTH_KEY = "authorization"
CLIENT_ID_KEY = "splitlora-client-id"
TOKEN = re.compile(r"[\x21-\x7e]{16,512}")  # printable ASCII, no spaces


def read_token_file(path: str | Path) -> dict[str, str]:
    """``NAME TOKEN`` per line (blank lines and ``#`` comments skipped), in file order."""
    path = Path(path)
    lines = _read_text(path, "token file").splitlines()
    tokens: dict[str, str] = {}
    seen: set[str] = set()
    for lineno, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        if len(parts) != 2:
            raise UserError(f"{path}:{lineno}: expected 'NAME TOKEN'")
        name, token = parts
        check_client_name(name, f"{path}:{lineno}")
        check_token(token, f"{path}:{lineno}")
        if name in tokens:
            raise UserError(f"{path}:{lineno}: client {name} listed twice")
        if token in seen:
            raise UserError(f"{path}:{lineno}: two clients share one token")
        tokens[name] = token
        seen.add(token)
    if not tokens:
        raise UserError(f"token file {path} lists no clients")
    return tokens


def read_client_token(path: str | Path) -> str:
    path = Path(path)
    token = _read_text(path, "token file").strip()
    if not token or len(token.split()) != 1:
        raise UserError(f"token file {path} must hold the token alone")
    return check_token(token, str(path))


def check_token(token: str, where: str) -> str:
    if not TOKEN.fullmatch(token):
        raise UserError(f"{where}: a token is 16 to 512 printable ASCII characters without spaces "
                        f"(got {len(token)} characters{', not all printable ASCII' if not token.isascii() else ''})")
    return token


def _read_text(path: Path, what: str) -> str:
    if not path.is_file():
        raise UserError(f"{what} not found: {path}")
    try:
        return path.read_text(encoding="utf-8-sig")  # a BOM is not part of the first name or token
    except UnicodeDecodeError:
        raise UserError(f"{what} {path} is not UTF-8 text") from None


def call_metadata(name: str, token: str) -> tuple[tuple[str, str], ...]:
    return ((AUTH_KEY, f"Bearer {token}"), (CLIENT_ID_KEY, name))


def caller(context) -> str:
    """The (already authenticated) client name of a call."""
    for key, value in context.invocation_metadata() or ():
        if key == CLIENT_ID_KEY:
            return value
    raise RuntimeError("call without a client id passed the interceptor")


def safe_text(text: str, limit: int = 200) -> str:
    """Text a client sent, fit for one log line: control characters escaped, length capped."""
    text = str(text)[:limit]
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


class TokenInterceptor(grpc.ServerInterceptor):
    """Refuse every call whose bearer token is not the named client's."""

    def __init__(self, tokens: dict[str, str], on_refused=None):
        self.tokens = {name: tok.encode() for name, tok in tokens.items()}
        self._dummy = secrets.token_hex(32).encode()
        self.on_refused = on_refused
        self.throttled = Throttled(log)

    def intercept_service(self, continuation, details):
        md: dict[str, str] = {}
        for key, value in details.invocation_metadata or ():
            md.setdefault(key, value)
        raw_name = md.get(CLIENT_ID_KEY, "")
        header = md.get(AUTH_KEY, "")
        token = header[len("Bearer "):].encode("utf-8", "replace") if header.startswith("Bearer ") else b""
        expected = self.tokens.get(raw_name) if isinstance(raw_name, str) else None
        match = hmac.compare_digest(token, expected if expected is not None else self._dummy)
        if match and token and expected is not None:
            return continuation(details)
        why = "no token" if not token else ("unknown client" if expected is None else "wrong token")
        method, name = details.method.rsplit("/", 1)[-1], safe_text(raw_name, 64)
        self.throttled.warning(name, f"auth {method} {why}", "refused %s (client %r): %s", method, name, why)
        if self.on_refused is not None:
            self.on_refused()
        return _refusal(continuation(details))


def _refusal(handler):
    """A handler of ``handler``'s kind that refuses the call (the real one never runs)."""
    def abort(request, context):
        context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong token for this client")

    if handler is None:
        return None
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(abort)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(abort)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(abort)
    return grpc.unary_unary_rpc_method_handler(abort)
