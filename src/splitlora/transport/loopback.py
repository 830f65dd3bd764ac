"""A whole deployment on one machine: ``splitlora serve`` and N ``splitlora client`` on 127.0.0.1.

:func:`run_loopback` runs one to the end and reports throughput and traffic (for benchmarks);
:class:`Loopback` starts and stops the processes one by one (for the fault tests).
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Sequence

from ..config import RunConfig
from ..runtime.metrics import read_metrics
from .serve import ENDPOINT_FILE


class LoopbackError(RuntimeError):
    pass


class Loopback:
    """Processes of one loopback deployment under ``root``: ``root/server`` is the serve ``--out``.

    Every wait has a timeout; :meth:`close` kills whatever is still running.
    """

    def __init__(self, cfg: RunConfig, client_csvs: Sequence[str | Path], root: str | Path,
                 tls: tuple[Path, Path, Path] | None = None, names: Sequence[str] | None = None):
        """Client ``i`` is named ``names[i]`` (default ``"0"``, ``"1"``, ...) and gets ``client_csvs[i]``."""
        self.cfg = cfg
        self.csvs = [Path(c) for c in client_csvs]
        self.root = Path(root)
        self.server_dir = self.root / "server"
        self.root.mkdir(parents=True, exist_ok=True)
        self.tls = tls  # (cert, key, ca)
        self.config_path = self.root / "run.yaml"
        cfg.save(self.config_path)
        self.names = list(names) if names is not None else [str(i) for i in range(len(self.csvs))]
        self.tokens = {name: secrets.token_urlsafe(24) for name in self.names}
        self.token_file = self.root / "tokens.txt"
        _write_private(self.token_file, "".join(f"{n} {t}\n" for n, t in self.tokens.items()))
        for name, token in self.tokens.items():
            _write_private(self.root / f"{name}.token", token + "\n")
        self.server: subprocess.Popen | None = None
        self.clients: dict[int, subprocess.Popen] = {}
        self._logs: list = []
        self.env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                    "PYTHONUNBUFFERED": "1"}

    # ---- processes --------------------------------------------------------------------------
    def _spawn(self, args: list[str], log_name: str) -> subprocess.Popen:
        log = (self.root / log_name).open("ab")
        self._logs.append(log)
        return subprocess.Popen([sys.executable, "-m", "splitlora.cli", *args], stdout=log, stderr=subprocess.STDOUT,
                                env=self.env)

    def start_server(self, *extra: str, resume: bool = False, listen: str = "127.0.0.1:0") -> subprocess.Popen:
        """Start ``splitlora serve``; ``listen`` = an earlier :meth:`endpoint` to come back on the same port."""
        (self.server_dir / ENDPOINT_FILE).unlink(missing_ok=True)
        args = ["serve", "-c", str(self.config_path), "--listen", listen, "--token-file",
                str(self.token_file), "--out", str(self.server_dir), "--quiet", *extra]
        if self.tls is not None:
            args += ["--tls-cert", str(self.tls[0]), "--tls-key", str(self.tls[1])]
        if resume:
            args.append("--resume")
        self.server = self._spawn(args, "server.log")
        return self.server

    def endpoint(self, timeout: float = 120.0) -> str:
        """``host:port`` once the server listens."""
        path = self.server_dir / ENDPOINT_FILE
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if path.is_file():
                return path.read_text().strip()
            if self.server is not None and self.server.poll() is not None:
                raise LoopbackError(f"server exited with {self.server.returncode}: {self.tail('server.log')}")
            time.sleep(0.1)
        raise LoopbackError(f"server did not listen within {timeout:.0f}s: {self.tail('server.log')}")

    def start_client(self, i: int, *extra: str, endpoint: str | None = None) -> subprocess.Popen:
        name = self.names[i]
        args = ["client", "--server", endpoint or self.endpoint(), "--token-file", str(self.root / f"{name}.token"),
                "--client-id", name, "--data", str(self.csvs[i]), "--quiet", *extra]
        if self.tls is not None:
            args += ["--tls-ca", str(self.tls[2])]
        self.clients[i] = self._spawn(args, f"client-{name}.log")
        return self.clients[i]

    def client_log(self, i: int) -> str:
        return f"client-{self.names[i]}.log"

    def wait(self, proc: subprocess.Popen, timeout: float, name: str = "process") -> int:
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise LoopbackError(f"{name} still running after {timeout:.0f}s") from None

    def kill(self, proc: subprocess.Popen | None, sig: int = signal.SIGKILL) -> None:
        if proc is not None and proc.poll() is None:
            proc.send_signal(sig)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=30)

    def close(self) -> None:
        for proc in [*self.clients.values(), self.server]:
            self.kill(proc)
        for log in self._logs:
            log.close()
        self._logs.clear()

    def tail(self, log_name: str, lines: int = 8) -> str:
        path = self.root / log_name
        if not path.is_file():
            return ""
        return " | ".join(path.read_text(errors="replace").strip().splitlines()[-lines:])

    # ---- results ----------------------------------------------------------------------------
    def metrics(self) -> list[dict]:
        return read_metrics(self.server_dir)

    def wait_for(self, predicate, timeout: float, what: str) -> list[dict]:
        """Poll the server's metrics until ``predicate(records)`` holds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            records = self.metrics()
            if predicate(records):
                return records
            if self.server is not None and self.server.poll() is not None:
                raise LoopbackError(f"server exited ({self.server.returncode}) before {what}: "
                                    f"{self.tail('server.log')}")
            time.sleep(0.1)
        raise LoopbackError(f"no {what} within {timeout:.0f}s: {self.tail('server.log')}")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def summarize(records: list[dict], adapter_dir: Path) -> dict:
    """Throughput and traffic from a server's ``metrics.jsonl`` records."""
    rows = [r for r in records if "event" not in r]
    aggs = [r for r in records if r.get("event") == "aggregate"]
    if not rows:
        raise LoopbackError("the server logged no steps")
    last = rows[-1]
    n = len(rows)
    return {
        "steps": last["step"],
        "tokens": last["tokens_total"],
        "seconds": last["elapsed_s"],
        "tokens_per_s": last["tokens_per_s"],
        "bytes_up_per_step": sum(r["bytes_up"] for r in rows) / n,
        "bytes_down_per_step": sum(r["bytes_down"] for r in rows) / n,
        "wire_bytes_up_per_step": sum(r.get("wire_bytes_up", 0) for r in rows) / n,
        "wire_bytes_down_per_step": sum(r.get("wire_bytes_down", 0) for r in rows) / n,
        "aggregation_bytes_up": sum(r["bytes_up"] for r in aggs),
        "aggregation_bytes_down": sum(r["bytes_down"] for r in aggs),
        "bytes_up_total": last["bytes_up_total"],
        "bytes_down_total": last["bytes_down_total"],
        "first_loss": rows[0]["loss"],
        "last_loss": last["loss"],
        "adapter_dir": str(adapter_dir),
    }


def run_loopback(cfg: RunConfig, client_csvs: Sequence[str | Path], out_dir: str | Path,
                 wire_dtype: str | None = None, mode: str = "processes", timeout: float = 600.0,
                 tls: tuple[Path, Path, Path] | None = None, serve_args: Sequence[str] = ()) -> dict:
    """Serve ``cfg`` to one client per CSV (client i gets ``client_csvs[i]``) on 127.0.0.1, to the end.

    ``mode="processes"``: the real commands, one process each. ``mode="threads"``: one process, one
    thread per party (less start-up, same protocol). Returns tokens/s (of the training loop, as
    ``splitlora train`` reports it), tensor bytes per step up/down (as the simulation counts them),
    bytes actually serialised per step, and ``adapter_dir``; ``wall_s`` includes start-up.
    """
    if wire_dtype is not None:
        cfg = replace(cfg, wire_dtype=wire_dtype).validate()
    if len(client_csvs) != cfg.clients:
        cfg = replace(cfg, clients=len(client_csvs)).validate()
    root = Path(out_dir)
    if (root / "server").is_dir():
        shutil.rmtree(root / "server")  # an earlier loopback run in the same folder
    start = time.perf_counter()
    if mode == "threads":
        result = _run_threads(cfg, client_csvs, Path(out_dir), timeout, tls)
    elif mode == "processes":
        result = _run_processes(cfg, client_csvs, Path(out_dir), timeout, tls, serve_args)
    else:
        raise ValueError(f"mode must be 'processes' or 'threads' (got {mode!r})")
    result["wall_s"] = time.perf_counter() - start
    result["wire_dtype"] = cfg.wire_dtype
    result["mode"] = mode
    return result


def _run_processes(cfg, csvs, root: Path, timeout: float, tls, serve_args) -> dict:
    deadline = time.monotonic() + timeout
    with Loopback(cfg, csvs, root, tls) as lb:
        lb.start_server("--join-timeout", str(timeout), *serve_args)
        endpoint = lb.endpoint(timeout=timeout)
        for i in range(len(csvs)):
            lb.start_client(i, endpoint=endpoint)
        rc = lb.wait(lb.server, max(deadline - time.monotonic(), 1), "server")
        if rc != 0:
            raise LoopbackError(f"server exited with {rc}: {lb.tail('server.log')}")
        for i, proc in lb.clients.items():
            rc = lb.wait(proc, max(deadline - time.monotonic(), 30), f"client {i}")
            if rc != 0:
                raise LoopbackError(f"client {i} exited with {rc}: {lb.tail(lb.client_log(i))}")
        return summarize(lb.metrics(), lb.server_dir / "adapter")


def _run_threads(cfg, csvs, root: Path, timeout: float, tls) -> dict:
    from ..config import ClientOptions, ServeOptions
    from .remote_client import RemoteClient
    from .serve import serve

    root.mkdir(parents=True, exist_ok=True)
    server_dir = root / "server"
    tokens = {str(i): secrets.token_urlsafe(24) for i in range(len(csvs))}
    ready = threading.Event()
    port: list[int] = []
    errors: list[BaseException] = []
    opts = ServeOptions(tokens=tokens, listen="127.0.0.1:0", progress=False, handle_signals=False,
                        join_timeout=timeout,
                        tls_cert=tls[0].read_bytes() if tls else None, tls_key=tls[1].read_bytes() if tls else None)

    def run_server():
        try:
            serve(cfg, opts, server_dir, on_ready=lambda p: (port.append(p), ready.set()))
        except BaseException as exc:  # reported below
            errors.append(exc)
            ready.set()

    def run_client(i):
        try:
            RemoteClient(ClientOptions(server=f"127.0.0.1:{port[0]}", client_id=str(i), token=tokens[str(i)],
                                       data=str(csvs[i]), tls_ca=tls[2].read_bytes() if tls else None,
                                       progress=False, reconnect_timeout=60)).run()
        except BaseException as exc:
            errors.append(exc)

    server = threading.Thread(target=run_server, name="loopback-server", daemon=True)
    server.start()
    if not ready.wait(timeout) or errors:
        raise LoopbackError(f"server did not start: {errors[0] if errors else 'timeout'}")
    clients = [threading.Thread(target=run_client, args=(i,), name=f"loopback-client{i}", daemon=True)
               for i in range(len(csvs))]
    for c in clients:
        c.start()
    deadline = time.monotonic() + timeout
    for th in [server, *clients]:
        th.join(max(deadline - time.monotonic(), 0.1))
        if th.is_alive():
            raise LoopbackError(f"{th.name} still running after {timeout:.0f}s")
    if errors:
        raise LoopbackError(f"loopback failed: {errors[0]!r}")
    return summarize(read_metrics(server_dir), server_dir / "adapter")


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
