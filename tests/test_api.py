"""The public API: ``import splitlora`` stays cheap, every exported name resolves, the registries find
third-party entries, and the two examples of docs/api.md run as written, in process and over loopback
gRPC, with the served adapter equal to the trained one."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import splitlora
from conftest import REPO, tiny_config
from splitlora.registry import AGGREGATORS, ALGORITHMS, Registry

DOC = REPO / "docs" / "api.md"


def test_import_is_cheap_and_every_name_resolves():
    code = "import sys, splitlora; print(sorted(m for m in ('torch', 'transformers', 'peft') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]"
    for name in splitlora.__all__:
        assert getattr(splitlora, name) is not None, name
    assert callable(splitlora.train) and splitlora.train.__module__ == "splitlora.simulation.run"
    with pytest.raises(AttributeError):
        splitlora.no_such_name  # noqa: B018


def test_entry_points_register_third_party_algorithms(tmp_path, monkeypatch):
    """A package that declares ``[project.entry-points."splitlora.algorithms"]`` is found without being imported."""
    (tmp_path / "my_algos.py").write_text("from splitlora import FedLoRA\n\nclass Mine(FedLoRA):\n    name = 'mine'\n")
    dist = tmp_path / "my_algos-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: my-algos\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[splitlora.algorithms]\nmine = my_algos:Mine\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    fresh = Registry("algorithm", "splitlora.algorithms", {"fed": "splitlora.algorithms.fed:FedLoRA"})
    assert "mine" in fresh and list(fresh) == ["fed", "mine"] and "my_algos" not in sys.modules
    assert fresh["mine"].__name__ == "Mine" and fresh["mine"].name == "mine"
    with pytest.raises(ValueError, match="already registered"):
        fresh.register("fed", object)
    bad = Registry("algorithm", "splitlora.no-group", {"broken": "splitlora.no_such_module:X"})
    with pytest.raises(splitlora.UserError, match="broken.*cannot load"):
        bad["broken"]
    with pytest.raises(splitlora.UserError, match="algorithm must be one of splitlora, sl, fed, cen"):
        splitlora.RunConfig(algorithm="nope").validate()


@pytest.fixture(scope="module")
def examples():
    """The definitions of docs/api.md (the blocks that register something), executed as written."""
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    defs = [b for b in blocks if "@register_" in b]
    assert len(defs) == 2
    namespace: dict = {}
    for block in defs:
        exec(compile(block, str(DOC), "exec"), namespace)
    yield namespace
    ALGORITHMS.unregister("oneshot")
    AGGREGATORS.unregister("my-median")


def _adapter(path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(Path(path) / "adapter_model.safetensors"))


def _diff(a, b) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def _in_process_and_loopback(cfg, tmp_path, tiny_gpt2):
    from splitlora.transport.loopback import run_loopback
    from test_deploy import write_client_csvs

    sim = splitlora.train(cfg, tmp_path / "train", progress=False, loaded=tiny_gpt2)
    csvs = write_client_csvs(cfg, tiny_gpt2.tokenizer, tmp_path / "data")
    served = run_loopback(cfg, csvs, tmp_path / "loop", mode="threads", timeout=240)
    assert _diff(_adapter(sim.adapter_dir), _adapter(served["adapter_dir"])) <= 1e-6
    events = [json.loads(x) for x in (sim.out_dir / "metrics.jsonl").read_text().splitlines()]
    return sim, [e for e in events if e.get("event") == "aggregate"]


def test_example_algorithm_runs_in_process_and_over_grpc(examples, tmp_path, tiny_gpt2):
    cfg = tiny_config(algorithm="oneshot", clients=2, steps=3, aggregate_every=1, threads=1)
    sim, aggregates = _in_process_and_loopback(cfg, tmp_path, tiny_gpt2)
    assert [a["step"] for a in aggregates] == [2] and aggregates[0]["clients"] == 2  # one average, at the end
    # one-shot averaging is fed with a single round
    fed = splitlora.train(tiny_config(algorithm="fed", clients=2, steps=3, aggregate_every=3, threads=1),
                          tmp_path / "fed", progress=False, loaded=tiny_gpt2)
    assert _diff(sim.adapter, fed.adapter) <= 1e-6


def test_example_aggregation_rule_runs_in_process_and_over_grpc(examples, tmp_path, tiny_gpt2):
    median = examples["coordinate_median"]
    states = [{"w": torch.tensor([float(i), 10.0 - i])} for i in (0, 1, 7)]
    out = median([(str(i), i, 5, s) for i, s in enumerate(states)], {"w": torch.zeros(2)}, None, 1)
    assert torch.equal(out.state["w"], torch.tensor([1.0, 9.0])) and out.used == ["0", "1", "2"]
    assert median([], {"w": torch.zeros(2)}, None, 1).state is None

    cfg = tiny_config(clients=3, steps=2, aggregate_every=2, synthetic_examples=60, threads=1,
                      aggregation={"rule": "my-median"})
    sim, aggregates = _in_process_and_loopback(cfg, tmp_path, tiny_gpt2)
    assert len(aggregates) == 1 and aggregates[0]["clients"] == 3
    mean = splitlora.train(tiny_config(clients=3, steps=2, aggregate_every=2, synthetic_examples=60, threads=1),
                           tmp_path / "mean", progress=False, loaded=tiny_gpt2)
    assert _diff(sim.adapter, mean.adapter) > 1e-6  # the rule is the one the run used
