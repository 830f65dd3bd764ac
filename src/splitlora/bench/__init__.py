"""Benchmarks: ``splitlora bench NAME`` (or ``python -m benchmarks NAME``): what the framework costs.

Each benchmark writes ``OUT/NAME.json``, ``OUT/NAME.md`` and ``OUT/NAME*.png``; ``all`` also writes
``OUT/summary.md`` and ``OUT/summary.json``. Every table row carries the command that made it.

=========== ===================================================================================
``overhead``  splitlora (1 client) vs cen training throughput, side by side in one process
``scale``     throughput and peak memory for 1..16 simulated clients sharing the base weights
``memory``    peak memory of the client side alone vs the whole model, for several cut layers
``wire``      bytes per step at fp32/bf16/fp16; loopback gRPC deployment vs in-process throughput
``ray``       the Ray backend: throughput and cost per step vs in process for 1..8 client actors, memory per actor
``gpu``       one GPU, bf16: splitlora vs a plain PEFT loop (8B-shaped and SmolLM2), memory per party, cuda tests
``secagg``    secure aggregation: bytes and seconds of one round for 3 and 10 sites at the real adapter size
=========== ===================================================================================

``all`` runs the timing suite (the first four). The long experiments (quality on real data, privacy,
time to quality) are ``splitlora experiment NAME`` (:mod:`splitlora.experiments`); they share this
package's runner (:func:`run_suite`), options and result writer.
"""

from __future__ import annotations

import importlib
import json
import time
import traceback
from dataclasses import dataclass, replace

from ..errors import UserError
from .common import BenchResult, Options, check_device, log, machine_info, sets_for, write_result

BENCHMARKS = ("overhead", "scale", "memory", "wire")  # what ``all`` runs
EXTRA = ("ray", "gpu", "secagg")  # run only by name
NAMES = (*BENCHMARKS, *EXTRA, "all")


@dataclass(frozen=True)
class Suite:
    """A family of runs started by name: each NAME is a module of ``package`` with ``Settings`` and ``run``."""

    runner: str  # the splitlora command: bench or experiment
    noun: str  # what one of them is called: benchmark or experiment
    package: str
    names: tuple[str, ...]  # what may be asked for ("all" among them: every one of ``everything``)
    everything: tuple[str, ...] = ()

    def module(self, name: str):
        return importlib.import_module(f"{self.package}.{name}")


BENCH = Suite("bench", "benchmark", __name__, NAMES, BENCHMARKS)


def run_benchmarks(name: str, opts: Options) -> int:
    """Run benchmark ``name`` (or every benchmark for ``all``); returns the exit code (1 if one crashed)."""
    return run_suite(BENCH, name, opts)


def run_suite(suite: Suite, name: str, opts: Options) -> int:
    """Run ``name`` of ``suite`` (``all``: its ``everything``); returns the exit code (1 if one crashed)."""
    if name not in suite.names:
        raise UserError(f"unknown {suite.noun} {name!r} (choose from {', '.join(suite.names)})")
    opts = replace(opts, device=check_device(opts.device), runner=suite.runner)
    names = list(suite.everything) if name == "all" else [name]
    per_bench = {n: sets_for(opts.sets, suite.module(n).Settings) for n in names}
    used = {k for s in per_bench.values() for k in s}
    unknown = sorted(set(opts.sets) - used)
    if unknown:
        valid = sorted({f for n in names for f in suite.module(n).Settings.__dataclass_fields__})
        raise UserError(f"no {suite.noun} in {name!r} has a setting {unknown[0]!r} (settings: {', '.join(valid)})")
    if opts.threads:
        import torch

        torch.set_num_threads(opts.threads)
    from .harness import quiet_transformers

    quiet_transformers()
    opts.out.mkdir(parents=True, exist_ok=True)
    machine = machine_info(opts.device)
    log(f"{suite.runner}: {', '.join(names)} -> {opts.out} (device {opts.device}{', quick' if opts.quick else ''}; "
        f"load average {machine.get('load_average')})")
    payloads, failed = [], False
    for n in names:
        bench_opts = replace(opts, sets=per_bench[n])
        t0 = time.perf_counter()
        try:
            result = suite.module(n).run(bench_opts)
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
