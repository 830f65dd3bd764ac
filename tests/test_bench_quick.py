"""A quick smoke run of every benchmark and of the ttq experiment (tiny-gpt2, a few steps), and their
command line."""

import json
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS = ("overhead", "scale", "memory", "wire")
RUNS = (*(("bench", b) for b in BENCHMARKS), ("experiment", "ttq"))  # (command, name) of what the fixture ran


def run(*args, timeout=600):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=REPO, timeout=timeout)


@pytest.fixture(scope="module")
def quick_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    proc = run("-m", "benchmarks", "all", "--quick", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = run("-m", "splitlora.experiments", "ttq", "--quick", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.mark.slow
def test_every_benchmark_writes_json_markdown_and_a_plot(quick_out):
    for _, name in RUNS:
        payload = json.loads((quick_out / f"{name}.json").read_text())
        assert payload["benchmark"] == name and payload["quick"] is True
        assert payload["skipped"] is None, payload["skipped"]
        assert payload["machine"]["cpu_cores"] >= 1
        assert payload["tables"] and all(t["rows"] for t in payload["tables"])
        assert (quick_out / f"{name}.md").read_text().startswith("## ")
        for plot in payload["plots"]:
            assert (quick_out / plot).stat().st_size > 1000
        assert payload["plots"]
    summary = (quick_out / "summary.md").read_text()
    assert all(f"({name}.md)" in summary for name in BENCHMARKS)


@pytest.mark.slow
def test_every_row_names_the_command_that_made_it(quick_out):
    from splitlora.cli import _register_optional, build_parser

    _register_optional()
    parser = build_parser()
    for command, name in RUNS:
        payload = json.loads((quick_out / f"{name}.json").read_text())
        main_table = payload["tables"][0]
        for row in main_table["rows"]:
            argv = shlex.split(row["command"])
            assert argv[:3] == ["splitlora", command, name] and "--quick" in argv
            args = parser.parse_args(argv[1:])  # the command parses as a `splitlora bench|experiment` command line
            assert args.name == name


@pytest.mark.slow
def test_quick_numbers_are_sane(quick_out):
    overhead = json.loads((quick_out / "overhead.json").read_text())
    row = overhead["tables"][0]["rows"][0]
    assert row["cen_tok_s"] > 0 and row["splitlora_tok_s"] > 0 and row["ratio"] > 0

    scale = json.loads((quick_out / "scale.json").read_text())["tables"][0]["rows"]
    assert [r["clients"] for r in scale] == [1, 3]
    assert all(r["peak_rss_mib"] > r["baseline_rss_mib"] > 0 for r in scale)
    # simulated clients share the base weights: the weights held do not grow with clients
    assert scale[1]["weights_mib"] == pytest.approx(scale[0]["weights_mib"], rel=0.01)
    assert scale[1]["lora_mib"] > scale[0]["lora_mib"]

    memory = json.loads((quick_out / "memory.json").read_text())["tables"][0]["rows"]
    whole, client = memory[0], memory[1]
    assert whole["side"] == "whole model" and client["side"] == "client"
    assert client["weights_mib"] < whole["weights_mib"] and client["tensors_mib"] < whole["tensors_mib"]

    wire = json.loads((quick_out / "wire.json").read_text())
    rows_b = {(r["shape"], r["wire_dtype"]): r for r in wire["tables"][0]["rows"]}
    assert all(r["formula_ok"] for r in rows_b.values())
    for shape in ("two-part", "u-shape"):
        assert rows_b[(shape, "bf16")]["down_per_step"] * 2 == rows_b[(shape, "fp32")]["down_per_step"]
    # The U-shape sends two tensors down where the two-part split sends one (same batches).
    assert rows_b[("u-shape", "fp32")]["down_per_step"] == 2 * rows_b[("two-part", "fp32")]["down_per_step"]
    transport = {(r["algorithm"], r["shape"]): r for r in wire["tables"][1]["rows"]}
    assert set(transport) == {("splitlora", "two-part"), ("splitlora", "u-shape")}
    assert all(r["inprocess_tok_s"] > 0 and r["loopback_tok_s"] > 0 for r in transport.values())

    ttq = json.loads((quick_out / "ttq.json").read_text())
    rows = {r["algorithm"]: r for r in ttq["tables"][0]["rows"]}
    assert set(rows) == {"cen", "fed", "sl", "splitlora", "splitlora:u-shape"}
    assert all(r["samples"] == rows["cen"]["samples"] for r in rows.values())  # same sample budget
    assert rows["cen"]["up_kib_per_step"] == 0 and rows["splitlora"]["up_kib_per_step"] > 0
    assert rows["splitlora:u-shape"]["down_kib_per_step"] > rows["splitlora"]["down_kib_per_step"]  # one more tensor
    assert rows["sl"]["steps"] == 2 * rows["splitlora"]["steps"]  # 2 clients take turns
    runs = ttq["extra"]["runs"]
    for algo, r in runs.items():
        sims = [e["sim_s"] for e in r["evals"]]
        assert sims[0] == 0 and sims == sorted(sims)


def test_lean_loading_equals_the_engine_model():
    import torch

    from splitlora.models.lean import lean_load
    from splitlora.models.loading import load_model
    from splitlora.models.split import client_forward, server_forward

    for name in ("tiny-gpt2", "tiny-llama"):
        ref = load_model(name).model.eval()
        ids = torch.randint(0, 1000, (2, 10))
        mask = torch.ones_like(ids)
        mask[1, 6:] = 0
        client, _ = lean_load(name, "client", 2)
        server, _ = lean_load(name, "server", 2)
        whole, _ = lean_load(name, "whole", 2)
        with torch.no_grad():
            want = ref(input_ids=ids, attention_mask=mask).logits
            split = server_forward(server.eval(), client_forward(client.eval(), ids, mask), mask)
            got = whole.eval()(input_ids=ids, attention_mask=mask).logits
        assert torch.equal(got, want) and torch.equal(split, want)
        # the client holds only its blocks (and the tied embedding), not the server's
        names = {n for n, _ in client.named_parameters()}
        assert not any(".2." in n or ".3." in n for n in names)


def test_settings_overrides():
    from splitlora.bench import scale
    from splitlora.bench.common import apply_sets
    from splitlora.errors import UserError
    from splitlora.experiments import ttq

    s = apply_sets(scale.Settings(), {"client_counts": "1,16", "steps": "3", "model": "tiny-gpt2"}, "scale")
    assert s.client_counts == [1, 16] and s.steps == 3 and s.model == "tiny-gpt2"
    assert apply_sets(scale.Settings(), {"client_counts": "none"}, "scale").client_counts == []
    t = apply_sets(ttq.Settings(), {"client_flops": "1e12", "algorithms": "cen,sl"}, "ttq")
    assert t.client_flops == 1e12 and t.algorithms == ["cen", "sl"] and t.latency().client_flops == 1e12
    with pytest.raises(UserError, match="unknown setting 'scale.nope'"):
        apply_sets(scale.Settings(), {"nope": 1}, "scale")
    with pytest.raises(UserError, match="did you mean 'scale.steps'"):
        apply_sets(scale.Settings(), {"stesp": 1}, "scale")
    with pytest.raises(UserError, match="scale.steps must be an integer"):
        apply_sets(scale.Settings(), {"steps": "1.5"}, "scale")
    with pytest.raises(UserError, match="ttq.client_flops must be a number"):
        apply_sets(ttq.Settings(), {"client_flops": "fast"}, "ttq")


@pytest.mark.parametrize("args,needle", [
    (["bench", "nope"], "invalid choice"),
    (["bench", "overhead", "--set", "nope=1"], "no benchmark"),
    (["bench", "scale", "--set", "steps=x"], "scale.steps must be an integer"),
    (["experiment", "ttq", "--set", "nope=1"], "no experiment"),
    (["bench", "overhead", "--device", "tpu"], "--device"),
])
def test_bad_input_is_one_line_exit_2(tmp_path, capsys, args, needle):
    from splitlora.cli import main

    try:
        rc = main([*args, "--out", str(tmp_path)])
    except SystemExit as exc:  # argparse's own errors
        rc = exc.code
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and needle in errors[0], err
    assert not any(tmp_path.iterdir())  # nothing was run


def test_python_m_benchmarks_wrapper_shares_the_cli():
    proc = run("-m", "benchmarks", "--help", timeout=120)
    assert proc.returncode == 0 and "overhead, scale, memory, wire" in proc.stdout
