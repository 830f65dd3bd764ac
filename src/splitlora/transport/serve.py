"""``splitlora serve``: the algorithm's server side, its clients over gRPC, checkpoints and resume.

The server runs the same algorithm and the same loop as ``splitlora train``
(:func:`splitlora.runtime.loop.run_loop`); only the grid differs (:class:`~splitlora.transport.sessions.GrpcGrid`).
It reads only its own part of the model (:class:`~splitlora.models.parts.LeanModel`; ``fed``: none).

Faults: a client that breaks off, stays silent past ``client_timeout`` or sends something invalid is
dropped from the round; it may say Hello again and is admitted at the next round boundary (at once
when fewer than ``min_clients`` are left) with the last averaged adapter. At the round boundaries
that are due, the server state is checkpointed atomically; ``resume`` continues from it. A failed
checkpoint stops the server (non-zero exit, port released, clients told), keeping the previous one.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import signal
import sys
import threading
from pathlib import Path

from tqdm.auto import tqdm

from ..algorithms import ALGORITHMS
from ..config import RunConfig, ServeOptions
from ..device import resolve_device, setup_torch
from ..errors import UserError
from ..models.lora import save_adapter
from ..models.parts import LeanModel
from ..runtime.checkpoint import load_checkpoint, save_checkpoint
from ..runtime.grid import Traffic
from ..runtime.metrics import MetricsLog
from ..runtime.loop import RunResult, Stopped, Totals, run_loop
from .service import start_grpc
from .sessions import GrpcGrid
from .sessions import Stopped as TooFew
from .wire import Limits, state_shapes

log = logging.getLogger("splitlora.transport.server")

ENDPOINT_FILE = "endpoint"  # DIR/endpoint: "host:port" once the server listens
CHECKPOINT_DIR = "checkpoint"
LABELS_WARNING = ("the two-part split sends every client's labels (its completion tokens, i.e. its private text) "
                  "to this server; set split_shape: u-shape to keep them on the clients (docs/privacy.md)")


class CheckpointFailed(Exception):
    pass


class Checkpointer:
    """Atomic checkpoints of the server side at consistent points; the metrics event after the file exists."""

    def __init__(self, out: Path, cfg: RunConfig, opts: ServeOptions, metrics: "_LockedMetrics"):
        self.dir, self.cfg, self.metrics = out / CHECKPOINT_DIR, cfg, metrics
        self.every = opts.checkpoint_every or cfg.aggregate_every
        self.clients = list(opts.tokens)
        self.last = 0

    def due(self, step: int) -> bool:
        return step - self.last >= self.every

    def save(self, algo, totals: Totals) -> None:
        offset = self.metrics.tell()
        state = {"config": self.cfg.to_dict(), "clients": self.clients, "step": totals.step,
                 "totals": {"tokens": totals.tokens, "elapsed": totals.elapsed, "first_loss": totals.first_loss,
                            "last_loss": totals.last_loss, "traffic": vars(totals.traffic)},
                 "algorithm": algo.state_dict(), "metrics_bytes": offset}
        try:
            save_checkpoint(self.dir, state)
        except OSError as exc:
            raise CheckpointFailed(f"cannot write the checkpoint at step {totals.step} ({exc.strerror or exc}); "
                                   f"the one at step {self.last} stands") from None
        self.last = algo.keep_from = totals.step
        self.metrics.write({"event": "checkpoint", "step": totals.step, "round": algo.round})


class _LockedMetrics:
    """The run's metrics log, written by the loop and (join/drop events) by handler threads."""

    def __init__(self, log_: MetricsLog):
        self.log, self.lock = log_, threading.Lock()

    def write(self, record: dict) -> None:
        with self.lock:
            self.log.write(record)

    def tell(self) -> int:
        with self.lock:
            return self.log.jsonl.tell()

    def close(self) -> None:
        with self.lock:
            self.log.close()


def read_resume_state(cfg: RunConfig, opts: ServeOptions, out: Path) -> dict | None:
    """The checkpoint to continue from (``opts.resume``), after checking it belongs to this run."""
    ckpt_dir = out / CHECKPOINT_DIR
    state = load_checkpoint(ckpt_dir)
    if not opts.resume:
        if state is not None:
            raise UserError(f"{ckpt_dir} holds a checkpoint of an earlier run: continue it with --resume, "
                            "or choose another --out")
        return None
    if state is None:
        raise UserError(f"--resume: no checkpoint in {ckpt_dir}")
    saved, now = state["config"], cfg.to_dict()
    if saved != now:
        key = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))[0]
        raise UserError(f"--resume: the config differs from the checkpoint's (key {key!r})")
    if state["clients"] != list(opts.tokens)[:len(state["clients"])]:
        raise UserError("--resume: the token file lists the clients in another order than the checkpoint "
                        "(the order fixes each client's data seed)")
    return state


def _truncate_metrics(path: Path, offset: int) -> list[dict]:
    """Cut ``metrics.jsonl`` back to the checkpoint (steps after it will run again); its step rows."""
    if path.is_file():
        with path.open("r+b") as fh:
            fh.truncate(min(offset, path.stat().st_size))
    rows = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if "event" not in record:
                rows.append(record)
    return rows


def check_certificate(pem: bytes | None) -> None:
    """A certificate that is expired (or not yet valid) is refused at start, not at the first client."""
    if pem is None:
        return
    try:
        from cryptography import x509
    except ImportError:  # cryptography is a dependency; without it the handshake reports the problem
        return
    try:
        cert = x509.load_pem_x509_certificate(pem)
    except ValueError:
        raise UserError("--tls-cert is not a valid PEM certificate") from None
    now = datetime.datetime.now(datetime.timezone.utc)
    if cert.not_valid_after_utc < now:
        raise UserError(f"--tls-cert expired on {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC")
    if cert.not_valid_before_utc > now:
        raise UserError(f"--tls-cert is not valid before {cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC")


def serve(cfg: RunConfig, opts: ServeOptions, out_dir: str | Path, on_ready=None,
          grid_box: list | None = None) -> RunResult:
    """Run the server side of ``cfg`` until the run is done, stopped, or out of clients.

    Writes ``DIR/config.yaml``, ``DIR/metrics.jsonl`` (+ ``.csv``), ``DIR/adapter/`` and
    ``DIR/checkpoint/``; ``DIR/endpoint`` tells where it listens. ``on_ready(port)`` is called once
    it listens; ``grid_box`` (a list) receives the :class:`GrpcGrid` (for tests).
    """
    algo_cls = ALGORITHMS[cfg.algorithm]
    if algo_cls.not_deployable:
        raise UserError(f"serve does not run algorithm {cfg.algorithm}: {algo_cls.not_deployable} "
                        f"(use `splitlora train --algorithm {cfg.algorithm}`)")
    opts.validate(cfg)
    check_certificate(opts.tls_cert)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / ENDPOINT_FILE).unlink(missing_ok=True)
    state = read_resume_state(cfg, opts, out)
    setup_torch(cfg.seed, cfg.threads)
    say = _sayer(opts.progress)
    if not cfg.u_shape and not algo_cls.whole_clients:
        say(f"warning: {LABELS_WARNING}")
    device = resolve_device(cfg.device)
    source = LeanModel(cfg.model, cfg)
    side = "whole" if algo_cls.whole_clients else "client"
    limits = Limits(cfg.batch_size, cfg.max_length, source.config.hidden_size, source.config.vocab_size,
                    cfg.wire_dtype, cfg.aggregation.value_bound(source.config.hidden_size), cfg.u_shape)

    if state is None:
        cfg.save(out / "config.yaml")
        metrics = _LockedMetrics(MetricsLog(out))
    else:
        rows = _truncate_metrics(out / "metrics.jsonl", int(state["metrics_bytes"]))
        metrics = _LockedMetrics(MetricsLog(out, append=True))
        metrics.log.rows = rows
    grid = GrpcGrid(cfg, opts, limits, {}, source.fingerprint(side), on_event=metrics.write)
    algo = algo_cls(cfg, source, grid, device)  # reads the server's part (if any) and nothing else
    grid.shapes = state_shapes(algo.global_state)
    totals = Totals()
    checkpointer = Checkpointer(out, cfg, opts, metrics)
    if state is not None:
        algo.load_state_dict(state["algorithm"])
        t = state["totals"]
        totals = Totals(int(state["step"]), int(t["tokens"]), float(t["elapsed"]), t["first_loss"], t["last_loss"],
                        Traffic(**t["traffic"]))
        checkpointer.last = algo.keep_from = totals.step
        grid.traffic = totals.traffic.copy()
        metrics.write({"event": "resume", "step": totals.step, "round": algo.round})
    if grid_box is not None:
        grid_box.append(grid)
    server, port = start_grpc(grid, opts)
    _write_endpoint(out, opts.listen, port)
    say(f"listening on {opts.listen.rsplit(':', 1)[0]}:{port} ({'TLS' if opts.tls_cert else 'no TLS'}); "
        f"{cfg.algorithm}, {cfg.clients} clients, {cfg.steps} steps")
    if on_ready is not None:
        on_ready(port)
    restore = _install_signals(grid) if opts.handle_signals else None
    whole_config = source.lora_config("whole")
    finished, reason, failure, hard_stop = False, "", None, False
    try:
        run_loop(cfg, algo, metrics, totals=totals, progress=opts.progress, desc="serve",
                 checkpointer=checkpointer, stop=grid.stopping)
        finished = True
        if checkpointer.last < totals.step:
            checkpointer.save(algo, totals)
    except (Stopped, TooFew) as stop:
        reason = str(stop)
        if algo.consistent and totals.step > checkpointer.last:
            try:
                checkpointer.save(algo, totals)
            except CheckpointFailed as exc:
                failure = str(exc)
    except CheckpointFailed as exc:
        failure, reason = str(exc), "its checkpoint failed"
        log.error("%s", exc)
    except KeyboardInterrupt:  # a second Ctrl-C: leave at once; the last checkpoint stands
        reason, hard_stop = "interrupted", True
        raise
    finally:
        if restore is not None:
            restore()
        try:
            # Also after a failed checkpoint: the adapter is the finished work (the state is at a
            # consistent point, as after Ctrl-C), and it may fit where the checkpoint did not. It was
            # not saved before, so a run whose final checkpoint failed lost its adapter (issue 11).
            if not hard_stop:
                try:
                    save_adapter(algo.adapter_state(), whole_config, source.base_path, out / "adapter")
                except OSError as exc:  # disk full: a one-line error, not a traceback
                    failure = (f"{failure}; " if failure else "") + f"cannot save the adapter ({exc.strerror or exc})"
                    log.error("cannot save the adapter: %s", exc.strerror or exc)
        finally:
            grid.close(finished, reason or failure or "")
            server.stop(grace=2).wait(5)
            metrics.close()
    result = RunResult(out, out / "adapter", {}, totals.first_loss, totals.last_loss, None, totals.tokens,
                       totals.elapsed, totals.traffic.up, totals.traffic.down, totals.step, finished,
                       totals.traffic.wire_up, totals.traffic.wire_down)
    result.port = port
    if failure is not None:
        if finished and "adapter" not in failure:
            raise UserError(f"the run finished and its adapter is in {out / 'adapter'}, but {failure}")
        raise UserError(f"serve stopped at step {totals.step}: {failure}")
    if not finished:
        if grid.stop_reason == "interrupted":
            raise KeyboardInterrupt
        raise UserError(f"serve stopped at step {totals.step} of {cfg.steps}: {reason}; the last checkpoint is "
                        f"at step {checkpointer.last} (serve --resume)")
    return result


def _write_endpoint(out: Path, listen: str, port: int) -> None:
    host = listen.rsplit(":", 1)[0]
    tmp = out / f".{ENDPOINT_FILE}.tmp"
    tmp.write_text(f"{host}:{port}\n")
    os.replace(tmp, out / ENDPOINT_FILE)


def _sayer(progress: bool):
    def say(text: str) -> None:
        if progress:
            tqdm.write(f"serve: {text}", file=sys.stderr)
        else:
            log.warning("%s", text) if text.startswith("warning") else log.info("%s", text)
    return say


def _install_signals(grid: GrpcGrid):
    """First Ctrl-C (or SIGTERM): finish the round, checkpoint, save, exit. Second: exit now."""
    if threading.current_thread() is not threading.main_thread():
        return None
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

    def first(signum, frame):
        grid.request_stop("interrupted")
        tqdm.write("serve: stopping at the end of this round (with a checkpoint); Ctrl-C again to quit at once",
                   file=sys.stderr)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.default_int_handler)

    signal.signal(signal.SIGINT, first)
    signal.signal(signal.SIGTERM, first)

    def restore():
        for s, handler in previous.items():
            signal.signal(s, handler)

    return restore


__all__ = ["serve", "read_resume_state", "CHECKPOINT_DIR", "ENDPOINT_FILE"]
