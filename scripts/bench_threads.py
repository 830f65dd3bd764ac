"""Seconds per training step for several ``--threads`` values, idle and beside a competing job.

    python scripts/bench_threads.py --steps 3 --repeats 2 --threads 0,1,2 --out bench-out/threads.jsonl

Each trial is ``splitlora train`` in a fresh process (the demo's config unless ``--args`` says
otherwise); its step time is read from the run's ``metrics.jsonl`` (``elapsed_s`` of the last step
/ steps: model loading is not counted). Trials are interleaved (A B C A B C ...) so that a change in
the machine's load hits every setting alike; the 1-minute load average is recorded with each trial.
``--compete N`` runs the same trials again beside a job that keeps N torch threads busy (a second
user's training on the same machine).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

COMPETITOR = """
import torch, sys
torch.set_num_threads(int(sys.argv[1]))
a = torch.randn(512, 512)
while True:
    a = (a @ a).tanh()
"""


def trial(threads: int, steps: int, extra: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as out:
        env = dict(os.environ)
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            env.pop(var, None)  # --threads 0 must mean what it means for a user: torch's own default
        cmd = [sys.executable, "-m", "splitlora.cli", "train", "--steps", str(steps), "--threads", str(threads),
               "--quiet", "--out", out, *extra]
        load = os.getloadavg()[0]
        t0 = time.perf_counter()
        subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
        wall = time.perf_counter() - t0
        rows = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
        last = [r for r in rows if "elapsed_s" in r][-1]
        return {"threads": threads, "s_per_step": last["elapsed_s"] / last["step"], "wall_s": round(wall, 2),
                "load1_before": load, "load1_after": os.getloadavg()[0]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", default="0,1,2")
    ap.add_argument("--compete", type=int, default=2, help="threads of the competing job (0: no competing phase)")
    ap.add_argument("--args", default="", help="extra train arguments, e.g. '--model tiny-llama'")
    ap.add_argument("--out", default="bench-out/threads.jsonl")
    a = ap.parse_args()
    settings = [int(t) for t in a.threads.split(",")]
    extra = a.args.split()
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    rows = []
    phases = [("idle", 0)] + ([("compete", a.compete)] if a.compete else [])
    for phase, n in phases:
        rival = subprocess.Popen([sys.executable, "-c", COMPETITOR, str(n)]) if n else None
        try:
            for r in range(a.repeats):
                for t in settings:
                    row = {"phase": phase, "repeat": r, **trial(t, a.steps, extra)}
                    rows.append(row)
                    print(json.dumps(row), flush=True)
                    with open(a.out, "a") as f:
                        f.write(json.dumps(row) + "\n")
        finally:
            if rival is not None:
                rival.terminate()
                rival.wait()
    print("\nphase    threads  median s/step  ratio to threads=0")
    for phase, _ in phases:
        base = statistics.median(r["s_per_step"] for r in rows if r["phase"] == phase and r["threads"] == settings[0])
        for t in settings:
            med = statistics.median(r["s_per_step"] for r in rows if r["phase"] == phase and r["threads"] == t)
            print(f"{phase:8s} {t:7d}  {med:13.2f}  {med / base:.2f}")


if __name__ == "__main__":
    main()
