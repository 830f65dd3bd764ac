"""Benchmarks: ``splitlora bench NAME`` (or ``python -m benchmarks NAME``).

Each benchmark writes ``OUT/NAME.json``, ``OUT/NAME.md`` and ``OUT/NAME*.png``; ``all`` also writes
``OUT/summary.md`` and ``OUT/summary.json``. Every table row carries the command that made it.

=========== ===================================================================================
``overhead``  splitlora (1 client) vs cen training throughput, side by side in one process
``scale``     throughput and peak memory for 1..16 simulated clients sharing the base weights
``memory``    peak memory of the client side alone vs the whole model, for several cut layers
``wire``      bytes per step at fp32/bf16/fp16; loopback gRPC deployment vs in-process throughput
``ttq``       validation loss vs simulated wall time (latency model) for cen, fed, sl, splitlora
``quality``   the paper's E2E table on real data: train all four, decode the 630 test MRs, score them
``privacy``   what the server reconstructs (tokens, labels) per split and defence, beside its utility
``ray``       the Ray backend: throughput and cost per step vs in process for 1..8 client actors, memory per actor
``gpu``       one GPU, bf16: splitlora vs a plain PEFT loop (8B-shaped and SmolLM2), memory per party, cuda tests
``secagg``    secure aggregation: bytes and seconds of one round for 3 and 10 sites at the real adapter size
=========== ===================================================================================

``all`` runs the timing suite (the first five); ``quality`` is a long real-data run of its own
(``splitlora bench quality``, about an hour on an idle 2-core CPU).
"""

from __future__ import annotations

import importlib
import json
import time
import traceback
from dataclasses import replace

from ..errors import UserError
from .common import BenchResult, Options, check_device, log, machine_info, sets_for, write_result

BENCHMARKS = ("overhead", "scale", "memory", "wire", "ttq")  # what ``all`` runs
EXTRA = ("quality", "privacy", "ray", "gpu", "secagg")  # run only by name
NAMES = (*BENCHMARKS, *EXTRA, "all")


def _module(name: str):
    return importlib.import_module(f"{__name__}.{name}")


def run_benchmarks(name: str, opts: Options) -> int:
    """Run ``name`` (or every benchmark for ``all``); returns the exit code (1 if one crashed)."""
    if name not in NAMES:
        raise UserError(f"unknown benchmark {name!r} (choose from {', '.join(NAMES)})")
    opts = replace(opts, device=check_device(opts.device))
    names = list(BENCHMARKS) if name == "all" else [name]
    per_bench = {n: sets_for(opts.sets, _module(n).Settings) for n in names}
    used = {k for s in per_bench.values() for k in s}
    unknown = sorted(set(opts.sets) - used)
    if unknown:
        valid = sorted({f for n in names for f in _module(n).Settings.__dataclass_fields__})
        raise UserError(f"no benchmark in {name!r} has a setting {unknown[0]!r} (settings: {', '.join(valid)})")
    if opts.threads:
        import torch

        torch.set_num_threads(opts.threads)
    from .harness import quiet_transformers

    quiet_transformers()
    opts.out.mkdir(parents=True, exist_ok=True)
    machine = machine_info(opts.device)
    log(f"benchmarks: {', '.join(names)} -> {opts.out} (device {opts.device}{', quick' if opts.quick else ''}; "
        f"load average {machine.get('load_average')})")
    payloads, failed = [], False
    for n in names:
        bench_opts = replace(opts, sets=per_bench[n])
        t0 = time.perf_counter()
        try:
            result = _module(n).run(bench_opts)
        except (UserError, KeyboardInterrupt):
            raise
        except Exception as exc:  # one broken benchmark must not lose the others' results
            failed = True
            log(f"[{n}] FAILED: {exc!r}\n{traceback.format_exc()}")
            result = BenchResult(n, n, {}, skipped=f"failed: {type(exc).__name__}: {exc}")
        result.seconds = time.perf_counter() - t0
        payloads.append(write_result(result, bench_opts, machine))
        log(f"[{n}] done in {result.seconds:.0f}s -> {opts.out / (n + '.md')}")
        for t in result.targets:
            log(f"  target: {t.line()}")
        if result.skipped:
            log(f"  skipped: {result.skipped}")
    if name == "all":
        _write_summary(payloads, opts, machine)
    return 1 if failed else 0


def _write_summary(payloads: list[dict], opts: Options, machine: dict) -> None:
    lines = ["# splitlora benchmarks", "",
             f"Command: `{opts.command('all')}`", "",
             f"Machine: {machine.get('cpu')} ({machine.get('cpu_cores')} cores, {machine.get('memory_gib')} GiB), "
             f"device {machine.get('device')}, torch {machine.get('torch')}, transformers {machine.get('transformers')}, "
             f"load average at start {machine.get('load_average')}, {machine.get('time')}.", "",
             "| benchmark | target | value | threshold | met |", "| --- | --- | --- | --- | --- |"]
    for p in payloads:
        for t in p["targets"]:
            value = "n/a" if t["value"] is None else f"{t['value']:.3f}"
            met = {True: "yes", False: "**no**", None: "not measured"}[t["met"]]
            lines.append(f"| {p['benchmark']} | {t['what']} | {value} | {t['op']} {t['threshold']} | {met} |")
    lines += ["", "| benchmark | seconds | status |", "| --- | --- | --- |"]
    for p in payloads:
        lines.append(f"| [{p['benchmark']}]({p['benchmark']}.md) | {p['seconds']:.0f} | {p['skipped'] or 'ok'} |")
    lines.append("")
    for p in payloads:
        md = opts.out / f"{p['benchmark']}.md"
        if md.is_file():
            lines += [md.read_text(), ""]
    (opts.out / "summary.md").write_text("\n".join(lines))
    (opts.out / "summary.json").write_text(json.dumps(
        {"command": opts.command("all"), "machine": machine,
         "benchmarks": [{k: p[k] for k in ("benchmark", "seconds", "skipped", "targets")} for p in payloads]},
        indent=2) + "\n")
