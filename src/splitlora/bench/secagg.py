"""Secure aggregation's cost per round: bytes and seconds of one SecAgg round (privacy/secagg.py) for
N sites, with the real adapter size of the model (the whole LoRA for ``fed``, the client side for
``splitlora``), beside plain FedAvg's bytes. Every party runs in this process, one after another, so
the seconds are the sum of every party's compute (no network time); the per-client and server
columns split it."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import numpy as np

from .common import BenchResult, Options, Table, apply_sets, log, median

NAME = "secagg"


@dataclass
class Settings:
    model: str = "smollm2-135m"
    sites: list[int] = field(default_factory=lambda: [3, 10])
    algorithms: list[str] = field(default_factory=lambda: ["fed", "splitlora"])
    repeats: int = 5
    cut_layer: int = 2

    @classmethod
    def quick(cls) -> "Settings":
        return cls(model="tiny-gpt2", sites=[3], algorithms=["fed"], repeats=2)


def adapter_length(model: str, algorithm: str, cut_layer: int) -> int:
    """Values of the adapter a site uploads (from the LoRA config on the model's meta skeleton)."""
    from ..config import RunConfig
    from ..models.parts import LeanModel

    cfg = RunConfig(model=model, algorithm=algorithm, cut_layer=cut_layer, clients=2).validate()
    source = LeanModel(model, cfg)
    from ..registry import ALGORITHMS

    side = "whole" if ALGORITHMS[algorithm].whole_clients else "client"
    from ..models.lora import add_lora

    part = source.part(side)
    add_lora(part, source.lora_config(side))
    return sum(p.numel() for n, p in part.named_parameters() if "lora_" in n)


def one_round(n: int, length: int, seed: int) -> dict:
    from ..privacy import secagg

    rng = np.random.default_rng(seed)
    p = secagg.Params(round=seed, clients=tuple(range(n)), threshold=secagg.default_threshold(n), clip=1.0,
                      max_weight=100_000, length=length)
    updates = {i: rng.normal(0, 0.02, length) for i in range(n)}
    t = {"client": 0.0, "server": 0.0}
    t0 = time.perf_counter()
    clients = {i: secagg.SecAggClient(i, p) for i in p.clients}
    keys = {i: c.advertise() for i, c in clients.items()}
    outgoing = {i: c.share(keys) for i, c in clients.items()}
    t["client"] += time.perf_counter() - t0
    masked = {}
    for i, c in clients.items():
        t0 = time.perf_counter()
        masked[i] = c.masked_input({j: out[i] for j, out in outgoing.items() if i in out}, updates[i], 100)
        t["client"] += time.perf_counter() - t0
    t0 = time.perf_counter()
    answers = [clients[i].unmask(sorted(masked), []) for i in sorted(masked)]
    t["client"] += time.perf_counter() - t0
    t0 = time.perf_counter()
    values, weight = secagg.unmask_sum(p, keys, sorted(outgoing), masked, answers)
    t["server"] = time.perf_counter() - t0
    view = {"keys": keys, "ciphertexts": outgoing, "masked": masked, "answers": answers}
    up = sum(secagg.view_bytes(view).values())
    down = n * (len(secagg.pack_params(p)) + len(secagg.pack_keys(keys)) + len(secagg.pack_roster(sorted(masked), [])))
    down += secagg.view_bytes(view)["shares"]  # every share is relayed once
    err = float(np.abs(values / weight - sum(np.clip(u, -1, 1) for u in updates.values()) / n).max())
    return {"client_s": t["client"] / n, "server_s": t["server"], "total_s": t["client"] + t["server"],
            "bytes_up": up, "bytes_down": down, "max_error": err}


def run(opts: Options) -> BenchResult:
    import os

    s = apply_sets(Settings.quick() if opts.quick else Settings(), opts.sets, NAME)
    result = BenchResult(NAME, f"Secure aggregation: cost per round ({s.model})", asdict(s))
    rows = []
    for algorithm in s.algorithms:
        length = adapter_length(s.model, algorithm, s.cut_layer)
        for n in s.sites:
            runs = [one_round(n, length, r) for r in range(s.repeats)]
            plain = 4 * length * n  # FedAvg: every site uploads its fp32 adapter, and gets the average back
            row = {"algorithm": algorithm, "sites": n, "values": length,
                   **{k: median([r[k] for r in runs]) for k in ("total_s", "client_s", "server_s")},
                   "bytes_up": runs[0]["bytes_up"], "bytes_down": runs[0]["bytes_down"],
                   "plain_up": plain, "up_vs_plain": runs[0]["bytes_up"] / plain,
                   "max_error": max(r["max_error"] for r in runs), "load": os.getloadavg()[0],
                   "command": opts.command(NAME, {"algorithms": [algorithm], "sites": [n]})}
            rows.append(row)
            if opts.progress:
                log(f"[secagg] {algorithm} n={n}: {row['total_s']:.2f}s/round, up {row['bytes_up'] / 2**20:.2f} MiB "
                    f"({row['up_vs_plain']:.2f}x FedAvg), max error {row['max_error']:.2g}")
    result.tables.append(Table("", [
        ("algorithm", "algorithm", ""), ("sites", "sites", "d"), ("values", "adapter values", ",d"),
        ("total_s", "round s (all parties)", ".3f"), ("client_s", "per client s", ".3f"),
        ("server_s", "server s", ".3f"), ("bytes_up", "bytes up", ",d"), ("bytes_down", "bytes down", ",d"),
        ("plain_up", "FedAvg bytes up", ",d"), ("up_vs_plain", "up vs FedAvg", ".2f"),
        ("max_error", "max |error| of the mean", ".2g"), ("load", "load", ".2f"), ("command", "command", "code")], rows))
    result.notes += [
        f"median over {s.repeats} rounds; every party in one process, serially, one thread: 'round s' is the sum "
        "of every party's compute, no network time. Bytes: payloads through the server (keys, encrypted shares, "
        "masked inputs of 8 bytes per value, unmasking shares), both ways; FedAvg: 4 bytes per value up.",
        "no drop in these rounds; a dropped site adds, for the server, one PRG expansion per survivor.",
    ]
    return result
