"""Seconds per training step at several thread counts, alternated step by step inside one run.

    python scripts/bench_threads_inprocess.py --threads 2,1 --rounds 2 --compete 2 -- --batch-size 2 --max-length 64

One simulation of the demo (3 in-process clients, smollm2-135m unless the train flags after ``--`` say
otherwise) is built once; its steps then run with the thread counts in turn (2, 1, 1, 2, ...: each
count sees the same drift of the machine's load), first as the machine is, then beside a job that
keeps ``--compete`` torch threads busy. Prints one JSON row per step (with the 1-minute load average)
and the median seconds per step of each count, per phase.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

COMPETITOR = """
import torch, sys
torch.set_num_threads(int(sys.argv[1]))
a = torch.randn(512, 512)
while True:
    a = (a @ a).tanh()
"""


def main() -> None:
    argv = sys.argv[1:]
    train_args = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", default="2,1")
    ap.add_argument("--rounds", type=int, default=2, help="palindromic rounds (each runs every count twice)")
    ap.add_argument("--compete", type=int, default=2, help="threads of the competing job (0: no such phase)")
    a = ap.parse_args(argv)
    counts = [int(t) for t in a.threads.split(",")]

    import torch

    from splitlora.cli import build_parser, resolve_config, _register_optional
    from splitlora.device import setup_torch
    from splitlora.simulation.run import build_simulation

    _register_optional()
    args = build_parser().parse_args(["train", *train_args])
    cfg = resolve_config(args)
    setup_torch(cfg.seed, counts[0])
    _, _, _, algo = build_simulation(cfg)
    order = (counts + counts[::-1]) * a.rounds
    rows, t = [], 0
    phases = [("as is", 0)] + ([(f"+{a.compete}-thread job", a.compete)] if a.compete else [])
    for phase, n in phases:
        rival = subprocess.Popen([sys.executable, "-c", COMPETITOR, str(n)]) if n else None
        try:
            for threads in order:
                torch.set_num_threads(threads)
                load = os.getloadavg()[0]
                t0 = time.perf_counter()
                algo.step(t % cfg.steps)
                row = {"phase": phase, "threads": threads, "s": round(time.perf_counter() - t0, 3),
                       "load1": load}
                t += 1
                rows.append(row)
                print(json.dumps(row), flush=True)
        finally:
            if rival is not None:
                rival.terminate()
                rival.wait()
    print(f"\n{'phase':16s} threads  median s/step  vs {counts[0]} threads   load1 (min-max)")
    for phase, _ in phases:
        base = statistics.median(r["s"] for r in rows if r["phase"] == phase and r["threads"] == counts[0])
        loads = [r["load1"] for r in rows if r["phase"] == phase]
        for c in counts:
            med = statistics.median(r["s"] for r in rows if r["phase"] == phase and r["threads"] == c)
            print(f"{phase:16s} {c:7d}  {med:13.2f}  {med / base:14.2f}   {min(loads):.1f}-{max(loads):.1f}")


if __name__ == "__main__":
    main()
