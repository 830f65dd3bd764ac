"""``splitlora train --backend ray``: the simulation's parties as Ray actors.

* :class:`ClientHost` (one Ray actor each, long-lived): one or more clients, built with the very code
  of the simulation (:func:`splitlora.simulation.parties.client_apps` on one :class:`~splitlora.models.parts.SharedModel`,
  so the clients of one actor share one copy of the base weights). Each keeps its part, its LoRA, its
  optimiser state, its data shard and its own random stream, and runs the commands it is given.
* :class:`ServerHost` (one more actor, with its own CPUs/GPUs): the algorithm, the one loop
  (:func:`splitlora.simulation.parties.run_training`) over a :class:`~splitlora.simulation.ray_grid.RayGrid`; it
  writes ``OUT/config.yaml``, ``OUT/metrics.jsonl`` (+ ``.csv``) and ``OUT/adapter/`` as ``train``
  does. It is placed on the driver's node when it can be, so that ``OUT`` is where the command ran.
* :func:`train_ray` (the driver): joins or starts the cluster, starts the actors, shows the server's
  progress, and stops everything it started.

Every actor reads ``cfg.model`` and ``cfg.data`` itself: on a cluster of several machines both must
be readable on every node (a hub id, a preset, or a path on a shared file system).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from ..config import RayOptions, RunConfig
from ..errors import UserError
from ..registry import ALGORITHMS
from ..runtime.grid import ClientInfo

log = logging.getLogger("splitlora.transport.ray")

INSTALL_HINT = "pip install 'splitlora[ray]'"


def import_ray():
    """``ray``, or a one-line error saying how to install it."""
    try:
        import ray
    except ImportError:
        raise UserError(f"--backend ray needs Ray, which is not installed: {INSTALL_HINT}") from None
    return ray


def _party_device(cfg: RunConfig, gpus: float) -> str:
    """A party's device: ``auto`` is a GPU where the actor reserved one (Ray hides the others)."""
    if cfg.device == "auto":
        return "cuda" if gpus > 0 else "cpu"
    return cfg.device


def _rss() -> dict:
    from ..device import peak_rss_mib, rss_mib

    return {"pid": os.getpid(), "rss_mib": rss_mib(), "peak_rss_mib": peak_rss_mib()}


class ClientHost:
    """The payload of a client actor: the clients of ``indices``, sharing one model."""

    def __init__(self, cfg: RunConfig, indices: list[int], device: str):
        from ..data import prepare_data
        from ..device import resolve_device, setup_torch
        from ..models.loading import load_model
        from ..models.precision import load_dtype
        from ..models.parts import SharedModel
        from .parties import client_apps

        _quiet_libraries()
        setup_torch(cfg.seed, cfg.threads)
        device = resolve_device(device)
        source = SharedModel(load_model(cfg.model, load_dtype(cfg)), cfg, device)
        data = prepare_data(cfg, source.tokenizer)
        self.apps = {app.name: app for app in client_apps(cfg, source, data, device, indices)}

    def clients(self) -> list[tuple[str, int, int]]:
        return [(a.name, a.index, a.num_samples) for a in self.apps.values()]

    def handle(self, name: str, command):
        from .ray_grid import portable

        return portable(self.apps[name].handle(command))

    def lora_state(self, name: str):
        return {k: v.cpu() for k, v in self.apps[name].lora_state().items()}

    def memory(self) -> dict:
        return _rss()


class ServerHost:
    """The payload of the server actor: the algorithm and the loop over a :class:`RayGrid`."""

    def __init__(self, cfg: RunConfig, hosts: dict, clients: list[ClientInfo], opts: RayOptions, out_dir: str,
                 device: str):
        self.cfg, self.hosts, self.clients, self.opts = cfg, hosts, clients, opts
        self.out, self.device = Path(out_dir), device
        self.last: dict = {}  # the last metrics row, for the driver's progress bar
        self.stop_reason: str | None = None

    def node(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()

    def progress(self) -> dict:
        return dict(self.last)

    def stop(self, reason: str) -> None:
        self.stop_reason = reason

    def memory(self) -> dict:
        return _rss()

    def run(self):
        from ..data import prepare_data
        from ..device import resolve_device, setup_torch
        from ..models.loading import load_model
        from ..models.precision import load_dtype
        from ..models.parts import SharedModel
        from ..runtime.metrics import MetricsLog
        from ..runtime.loop import Stopped
        from .parties import run_training
        from .ray_grid import RayGrid

        _quiet_libraries()
        cfg = self.cfg
        self.out.mkdir(parents=True, exist_ok=True)
        setup_torch(cfg.seed, cfg.threads)
        device = resolve_device(self.device)
        source = SharedModel(load_model(cfg.model, load_dtype(cfg)), cfg, device)
        data = prepare_data(cfg, source.tokenizer)
        watched = self

        class Metrics(MetricsLog):
            def write(self, record: dict) -> None:
                super().write(record)
                if "event" not in record:
                    watched.last = record

        metrics = Metrics(self.out)
        grid = RayGrid(self.hosts, self.clients, cfg.wire_dtype, self.opts.timeout, on_event=metrics.write)
        algo = ALGORITHMS[cfg.algorithm](cfg, source, grid, device)
        try:
            result = run_training(cfg, self.out, source, data, algo, progress=False, metrics=metrics,
                                  stop=lambda: self.stop_reason)
            grid.close()
        except Stopped as exc:
            return {"stopped": str(exc), "step": self.last.get("step", 0)}
        result.finished = True
        return result


def _quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    transformers_logging.set_verbosity_error()


# ---- the driver ---------------------------------------------------------------------------------

def connect(opts: RayOptions) -> bool:
    """Join ``opts.address`` (or start a local cluster); True when this call started Ray here."""
    ray = import_ray()
    if ray.is_initialized():
        return False
    kwargs = dict(include_dashboard=False, log_to_driver=True, logging_level=logging.WARNING,
                  configure_logging=True)
    # the actors import splitlora from this checkout or installation, as the driver does
    env = {"env_vars": {"TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "0"),
                        "TRANSFORMERS_OFFLINE": os.environ.get("TRANSFORMERS_OFFLINE", "0")}}
    try:
        if opts.address:
            ray.init(address=opts.address, runtime_env=env, **{k: v for k, v in kwargs.items()
                                                               if k != "include_dashboard"})
        else:
            ray.init(num_cpus=opts.num_cpus, runtime_env=env, **kwargs)
    except ConnectionError as exc:
        raise UserError(f"--ray-address {opts.address}: cannot reach a Ray cluster there ({_first_line(exc)}); "
                        f"start one with `ray start --head`") from None
    return True


def fitting_actors(have: dict, opts: RayOptions, n: int) -> int:
    """Client actors for ``n`` clients when ``--ray-actors`` is not given: one per client where the cluster
    has room, else as many as fit (the clients queue on them: an actor steps its clients in turn)."""
    fits = n
    for kind in ("CPU", "GPU"):
        per = getattr(opts, f"client_{kind.lower()}s")
        if per > 0:
            fits = min(fits, int((have.get(kind, 0) - getattr(opts, f"server_{kind.lower()}s") + 1e-9) // per))
    return max(1, fits)


def check_resources(ray, opts: RayOptions, actors: int) -> None:
    """Refuse at once what the cluster cannot place (Ray would wait for it forever)."""
    have = ray.cluster_resources()
    need = {"CPU": actors * opts.client_cpus + opts.server_cpus, "GPU": actors * opts.client_gpus + opts.server_gpus}
    for kind, amount in need.items():
        if amount > have.get(kind, 0) + 1e-9:
            raise UserError(f"the Ray cluster has {have.get(kind, 0):g} {kind}s; {actors} client actors x "
                            f"--client-{kind.lower()}s {getattr(opts, 'client_' + kind.lower() + 's'):g} + the server's "
                            f"{getattr(opts, 'server_' + kind.lower() + 's'):g} need {amount:g} (lower --client-"
                            f"{kind.lower()}s or --ray-actors, or add nodes)")


def start_clients(cfg: RunConfig, opts: RayOptions) -> tuple[list, dict, list[ClientInfo]]:
    """The client actors (started and ready): ``(actors, {name: actor}, clients)``."""
    ray = import_ray()
    n = ALGORITHMS[cfg.algorithm].parties(cfg)
    groups = opts.clients_per_actor(n, opts.actors or fitting_actors(ray.cluster_resources(), opts, n))
    check_resources(ray, opts, len(groups))
    actor_cls = ray.remote(ClientHost)
    device = _party_device(cfg, opts.client_gpus)
    actors = [actor_cls.options(num_cpus=opts.client_cpus, num_gpus=opts.client_gpus, name=None,
                                max_restarts=0).remote(cfg, group, device) for group in groups]
    try:
        listed = ray.get([a.clients.remote() for a in actors], timeout=max(opts.timeout, 60.0))
    except ray.exceptions.GetTimeoutError:
        stop_actors(actors)
        raise UserError(f"the client actors did not start within {max(opts.timeout, 60.0):g}s") from None
    except ray.exceptions.RayError as exc:
        stop_actors(actors)
        raise UserError(f"a client actor failed to start: {_cause(exc)}") from None
    hosts, clients = {}, []
    for actor, rows in zip(actors, listed):
        for name, index, samples in rows:
            hosts[name] = actor
            clients.append(ClientInfo(name, index, samples))
    return actors, hosts, clients


def stop_actors(actors) -> None:
    ray = import_ray()
    for a in actors:
        try:
            ray.kill(a)
        except Exception:  # already gone
            pass


def train_ray(cfg: RunConfig, out_dir, opts: RayOptions, progress: bool = True):
    """``train`` with the parties as Ray actors; returns the server's :class:`~splitlora.runtime.loop.RunResult`."""
    ray = import_ray()
    opts.validate(cfg)
    from ..models.loading import resolve_model

    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    resolve_model(cfg.model)  # converts a preset or GGUF once, before the actors read it
    started = connect(opts)
    actors, server = [], None
    try:
        actors, hosts, clients = start_clients(cfg, opts)
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        here = ray.get_runtime_context().get_node_id()
        server_cls = ray.remote(ServerHost)
        server = server_cls.options(num_cpus=opts.server_cpus, num_gpus=opts.server_gpus, max_concurrency=2,
                                    scheduling_strategy=NodeAffinitySchedulingStrategy(here, soft=True)).remote(
            cfg, hosts, clients, opts, str(out), _party_device(cfg, opts.server_gpus))
        if ray.get(server.node.remote(), timeout=max(opts.timeout, 60.0)) != here:
            log.warning("the server actor runs on another node than this command: %s is written there", out)
        result = _follow(ray, server, server.run.remote(), cfg, progress)
    finally:
        stop_actors([*actors, *([server] if server is not None else [])])
        if started:
            ray.shutdown()
    if isinstance(result, dict):
        raise UserError(f"the run stopped after step {result['step']}: {result['stopped']}; the adapter as of then "
                        f"is in {out / 'adapter'}")
    return result


def _follow(ray, server, run_ref, cfg: RunConfig, progress: bool):
    """Wait for the server's run, showing its progress; Ctrl-C stops it at the end of the round."""
    from tqdm.auto import tqdm

    bar = tqdm(total=cfg.steps, desc=f"{cfg.algorithm} (ray)", unit="step", disable=not progress,
               dynamic_ncols=True)
    interrupted = False
    try:
        while True:
            try:
                ready, _ = ray.wait([run_ref], timeout=0.5)
                if not progress and not ready:
                    continue
                row = ray.get(server.progress.remote()) if progress else {}
                if row:
                    bar.update(row["step"] - bar.n)
                    bar.set_postfix(loss=f"{row['loss']:.3f}" if row.get("loss") is not None else "-",
                                    tok_s=f"{row.get('tokens_per_s', 0):.0f}")
                if ready:
                    break
            except KeyboardInterrupt:
                if interrupted:
                    raise
                interrupted = True
                server.stop.remote("interrupted (Ctrl-C)")
                print("\ninterrupted: the run stops at the end of the round (Ctrl-C again to quit now)")
        try:
            result = ray.get(run_ref)
        except ray.exceptions.RayTaskError as exc:
            cause = exc.cause if getattr(exc, "cause", None) is not None else exc
            if isinstance(cause, UserError):
                raise UserError(str(cause)) from None
            raise
        except ray.exceptions.RayActorError as exc:
            raise UserError(f"the server actor died: {_first_line(exc)}") from None
    finally:
        bar.close()
    if interrupted:
        raise KeyboardInterrupt
    return result


def _cause(exc) -> str:
    cause = getattr(exc, "cause", None)
    return _first_line(cause if cause is not None else exc)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__
