"""``splitlora experiment quality``: the quick mode end to end on the real E2E files (tiny-gpt2), its
schedule arithmetic, and its errors."""

from __future__ import annotations

import json
import math
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from splitlora.experiments.quality import (ALGOS, Settings, evenly_spaced, rounded_samples, rows_read, samples_seen,
                                     schedule)

REPO = Path(__file__).resolve().parents[1]
METRICS = ("bleu", "nist", "meteor", "rouge_l", "cider")


def _bench(*args: str, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "splitlora.cli", "experiment", "quality", *args], capture_output=True,
                          text=True, cwd=REPO, timeout=timeout, env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})})


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    from conftest import E2E_DIR

    if not (E2E_DIR / "devset.csv").is_file():
        pytest.skip("../shared/data/e2e is absent")
    out = tmp_path_factory.mktemp("quality")
    proc = _bench("--quick", "--quiet", "--out", str(out), "--set", f"data_dir={E2E_DIR}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, json.loads((out / "quality.json").read_text())


@pytest.mark.slow
def test_quick_run_writes_the_table_and_the_plot(quick):
    out, payload = quick
    assert payload["benchmark"] == "quality" and payload["skipped"] is None and payload["quick"] is True
    assert (out / "quality.md").read_text().startswith("## E2E quality on real data")
    assert payload["plots"] == ["quality.png"] and (out / "quality.png").stat().st_size > 1000
    s = Settings.quick()
    rows = payload["tables"][0]["rows"]
    # one row for the base model, one per algorithm and seed (2 seeds for cen and splitlora)
    expected = ["base"] + [f"{a}-seed{seed}" for seed in (0, 1) for a in ALGOS if seed in
                           (s.seeds if a in ("cen", "splitlora") else s.other_seeds)]
    assert [r["system"] for r in rows] == expected
    assert sorted(r["system"] for r in rows) == sorted(["base", "cen-seed0", "cen-seed1", "splitlora-seed0",
                                                        "splitlora-seed1", "fed-seed0", "sl-seed0"])
    for row in rows:
        for key in ("bleu", "nist", "rouge_l", "cider"):
            assert math.isfinite(row[key]) and row[key] >= 0, (row["system"], key)
        assert row["meteor"] is None or math.isfinite(row["meteor"])
        assert row["bleu100"] == pytest.approx(row["bleu"] * 100)
        argv = shlex.split(row["command"])
        assert argv[:3] == ["splitlora", "experiment", "quality"] and "--quick" in argv
    predictions = (out / "quality-runs" / "splitlora-seed1" / "predictions.txt").read_text().split("\n")
    assert len(predictions) - 1 == s.test_mrs  # one line per decoded test MR


@pytest.mark.slow
def test_every_algorithm_saw_the_same_samples(quick):
    _, payload = quick
    s = Settings.quick()
    trained = [r for r in payload["tables"][0]["rows"] if r["system"] != "base"]
    assert {r["samples"] for r in trained} == {rounded_samples(s)}
    steps = {r["algorithm"]: r["steps"] for r in trained}
    assert steps["sl"] == s.clients * steps["cen"] == s.clients * steps["splitlora"] == s.clients * steps["fed"]
    metrics = Path(payload["extra"]["runs_dir"]) / "sl-seed0" / "metrics.jsonl"
    logged = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert max(row.get("step", 0) for row in logged if "loss" in row) == steps["sl"]  # the run really took them


@pytest.mark.slow
def test_the_curve_has_the_requested_points(quick):
    _, payload = quick
    s = Settings.quick()
    curves = payload["extra"]["curves"]
    assert sorted(curves) == sorted(ALGOS)
    total = rounded_samples(s)
    for algo, points in curves.items():
        # the base model at 0 samples, then curve_points points, the last at the full budget
        assert [p["samples"] for p in points] == [k * total // s.curve_points for k in range(s.curve_points + 1)], algo
        assert all(math.isfinite(p["bleu"]) for p in points)
    assert len(payload["extra"]["curve_mr_indices"]) == s.curve_mrs
    phases = {row["phase"]: row["seconds"] for row in payload["tables"][4]["rows"]}
    assert phases["whole benchmark (incl. loading)"] >= phases["train (all runs)"] > 0


def test_schedule_gives_every_algorithm_the_same_budget():
    s = Settings()  # the CPU default: 3 clients, batch 4
    total = rounded_samples(Settings(samples=1000))
    assert total % (s.clients * s.batch_size * s.curve_points) == 0 and 1000 <= total < 1000 + 48
    plans = {a: schedule(a, s, total) for a in ALGOS}
    assert {a: p["steps"] * p["per_step"] for a, p in plans.items()} == {a: total for a in ALGOS}
    assert plans["cen"]["batch_size"] == 12 and plans["sl"]["batch_size"] == plans["fed"]["batch_size"] == 4
    assert plans["sl"]["steps"] == 3 * plans["splitlora"]["steps"]
    for p in plans.values():  # the snapshots fall on the curve's points
        assert p["save_every"] * s.curve_points == p["steps"]
    # counting rows: full batches, the last batch of a pass partial
    assert rows_read(10, 4, 2) == 8 and rows_read(10, 4, 3) == 10 and rows_read(10, 4, 4) == 14
    shares = [1558, 1557, 1557]
    for algo, p in plans.items():
        n = shares if algo != "cen" else [sum(shares)]
        assert samples_seen(algo, s, p["steps"], p["batch_size"], n) == total, algo
    # a share smaller than its steps' batches: the partial batch is counted, not the nominal size
    assert samples_seen("splitlora", s, 3, 4, [10, 12, 12]) == 10 + 12 + 12
    assert evenly_spaced(630, 100)[0] == 0 and evenly_spaced(630, 100)[-1] == 629 and len(evenly_spaced(630, 100)) == 100
    assert evenly_spaced(5, 10) == [0, 1, 2, 3, 4]


def test_missing_data_is_a_one_line_error(tmp_path):
    from conftest import cli_in_process

    def _bench(*args, timeout=None):  # in this process: a fresh interpreter per error costs seconds
        return cli_in_process("experiment", "quality", *args)

    proc = _bench("--quick", "--out", str(tmp_path / "out"), "--set", f"data_dir={tmp_path / 'nowhere'}", timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and "nowhere" in lines[-1] and "Traceback" not in proc.stderr
    (tmp_path / "only-test").mkdir()
    (tmp_path / "only-test" / "testset_w_refs.csv").write_text("mr,ref\na[1],x\n")
    proc = _bench("--quick", "--out", str(tmp_path / "out"), "--set", f"data_dir={tmp_path / 'only-test'}", timeout=120)
    assert proc.returncode == 2 and "training CSV" in proc.stderr.strip().splitlines()[-1]


def test_quality_is_an_experiment_not_a_benchmark(capsys, tmp_path):
    from splitlora.bench import BENCHMARKS, NAMES
    from splitlora.cli import main
    from splitlora.experiments import NAMES as EXPERIMENTS

    assert EXPERIMENTS == ("quality", "privacy", "ttq") and not set(EXPERIMENTS) & set(NAMES)
    assert BENCHMARKS == ("overhead", "scale", "memory", "wire")
    # the old command still runs it, after saying where it moved (here: up to a one-line bad-setting error)
    assert main(["bench", "quality", "--quick", "--out", str(tmp_path), "--set", "nope=1"]) == 2
    err = capsys.readouterr().err
    assert "moved to `splitlora experiment quality`" in err and "no experiment in 'quality' has a setting" in err
