"""The Ray backend on a local cluster (2 CPUs, started and stopped here): the adapter and the metrics
rows of the in-process run, for every algorithm; several clients per actor; a client actor killed
mid-round is dropped and the run goes on. Also the server part placed with a device map (no Ray
needed): the mapped server trains what the unmapped one trains.

Skips (the Ray tests) when Ray is not installed: ``pip install 'splitlora[ray]'``.
"""

import json

import pytest
import torch
from conftest import tiny_config
from safetensors.torch import load_file

from splitlora.config import RayOptions
from splitlora.simulation.run import train

STEP_KEYS = ("step", "loss", "lr", "tokens", "tokens_total", "bytes_up", "bytes_down", "bytes_up_total",
             "bytes_down_total", "clients")


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray", reason="Ray is not installed: pip install 'splitlora[ray]'")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        yield ray
    finally:
        ray.shutdown()


def _adapter(run_dir):
    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


def _max_diff(a, b) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def _records(run_dir):
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [[r[k] for k in STEP_KEYS] for r in rows if "event" not in r]
    events = [{k: v for k, v in r.items() if k != "elapsed_s"} for r in rows if "event" in r]
    return steps, events


def _options(**kw) -> RayOptions:
    # 300 s: the actors' start (each imports torch) is bounded by max(timeout, 60 s); beside the other slow
    # tests on a loaded 2-core machine it took over 120 s.
    return RayOptions(backend="ray", **{"client_cpus": 0.5, "server_cpus": 0.5, "timeout": 300.0, **kw})


CASES = {
    "splitlora-sequential": dict(algorithm="splitlora", client_lora={"rank": 4, "dropout": 0.1},
                                 server_lora={"rank": 4, "dropout": 0.1}),
    "splitlora-batched": dict(algorithm="splitlora", server_mode="batched", wire_dtype="bf16", clients=3,
                              clients_per_round=2, aggregate_every=1),  # a seeded sample of 2 clients per round
    "sl": dict(algorithm="sl", aggregate_every=1, clients=3),
    "fed": dict(algorithm="fed", clients=3, clients_per_round=2),
    "cen": dict(algorithm="cen"),
}
ACTORS = {"fed": 2, "splitlora-batched": 1}  # several clients per actor (one shared copy of the model)
# sl: the default reservations (1 CPU per client actor, 1 for the server) on the 2-CPU cluster: its 3
# clients queue on the one client actor that fits
RESERVE = {"sl": dict(client_cpus=1.0, server_cpus=1.0)}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_ray_run_equals_in_process_run(tmp_path, tiny_gpt2, ray_cluster, case):
    cfg = tiny_config(steps=4, threads=1, **CASES[case])
    train(cfg, tmp_path / "inprocess", progress=False, loaded=tiny_gpt2)
    result = train(cfg, tmp_path / "ray", progress=False, backend=_options(actors=ACTORS.get(case, 0),
                                                                                      **RESERVE.get(case, {})))
    a, b = _adapter(tmp_path / "inprocess"), _adapter(tmp_path / "ray")
    diff = _max_diff(a, b)
    print(f"{case}: max abs diff of the adapters, ray vs in-process = {diff:.3g}")
    assert diff <= 1e-6
    assert diff == 0.0  # the same code on the same numbers: bit for bit
    assert _records(tmp_path / "inprocess") == _records(tmp_path / "ray")  # loss, lr, tokens, bytes; events
    assert result.steps_done == cfg.steps and result.finished
    assert (tmp_path / "ray" / "config.yaml").read_text() == (tmp_path / "inprocess" / "config.yaml").read_text()


@pytest.mark.slow
def test_killed_client_actor_is_dropped_and_the_run_goes_on(tmp_path, tiny_gpt2, ray_cluster):
    from splitlora.algorithms import ALGORITHMS
    from splitlora.messages import Forward
    from splitlora.models.parts import SharedModel
    from splitlora.runtime.metrics import MetricsLog, read_metrics
    from splitlora.runtime.loop import run_loop
    from splitlora.simulation.ray_backend import start_clients, stop_actors
    from splitlora.simulation.ray_grid import RayGrid

    cfg = tiny_config(clients=3, steps=6, aggregate_every=4, threads=1)
    actors, hosts, clients = start_clients(cfg, _options(actors=2))  # client 0 alone, clients 1 and 2 together
    try:
        metrics = MetricsLog(tmp_path)
        grid = RayGrid(hosts, clients, cfg.wire_dtype, timeout=60.0, on_event=metrics.write)

        def kill_mid_round(direction, name, message, nbytes):
            if direction == "down" and name == "1" and isinstance(message, Forward) and message.step == 2:
                ray_cluster.kill(hosts["1"])

        grid.observers.append(kill_mid_round)
        source = SharedModel(tiny_gpt2, cfg)
        algo = ALGORITHMS[cfg.algorithm](cfg, source, grid)
        totals = run_loop(cfg, algo, metrics, progress=False)
        final = algo.adapter_state()
        metrics.close()
        grid.close()
    finally:
        stop_actors(actors)
    assert totals.step == cfg.steps  # the run finished
    records = read_metrics(tmp_path)
    drops = [r for r in records if r.get("event") == "drop"]
    assert sorted(r["client"] for r in drops) == ["1", "2"]  # both clients of the dead actor
    assert all(2 <= r["step"] <= 3 and "died" in r["reason"] for r in drops)
    steps = [r for r in records if "event" not in r]
    assert [r["clients"] for r in steps][:2] == [3, 3] and [r["clients"] for r in steps][4:] == [1, 1]
    rounds = [r for r in records if r.get("event") == "aggregate"]
    assert rounds[0]["used"] == ["0"] and rounds[-1]["used"] == ["0"]
    assert all(torch.isfinite(v).all() for v in final.values())


DEVICE_MAPS = {"auto": "auto",
               "per-block": "transformer.h.2=cpu,transformer.h.3=cpu,transformer.ln_f=cpu,lm_head=cpu"}


@pytest.mark.parametrize("name", list(DEVICE_MAPS))
def test_server_placed_with_a_device_map_trains_what_the_unmapped_server_trains(tmp_path, tiny_gpt2, name):
    from splitlora.models.parts import SharedModel

    cfg = tiny_config(steps=3, threads=1)
    mapped = cfg.with_overrides({"server_device_map": DEVICE_MAPS[name]})
    part = SharedModel(tiny_gpt2, mapped).lora_part("server")
    assert part.hf_device_map and any(hasattr(m, "_hf_hook") for m in part.modules())  # accelerate placed it
    train(cfg, tmp_path / "plain", progress=False, loaded=tiny_gpt2)
    train(mapped, tmp_path / "mapped", progress=False, loaded=tiny_gpt2)
    diff = _max_diff(_adapter(tmp_path / "plain"), _adapter(tmp_path / "mapped"))
    print(f"device map {name}: max abs diff of the adapters, mapped vs unmapped server = {diff:.3g}")
    assert diff == 0.0
    assert _records(tmp_path / "plain")[0] == _records(tmp_path / "mapped")[0]


def test_bad_backend_input_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys):
    import sys

    from splitlora.cli import main

    assert main(["train", "--model", "tiny-gpt2", "--ray-address", "auto", "--out", str(tmp_path)]) == 2
    assert "--ray-address needs --backend ray" in capsys.readouterr().err
    assert main(["train", "--model", "tiny-gpt2", "--server-device-map", "lm_head", "--out", str(tmp_path)]) == 2
    assert "server_device_map" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    assert main(["train", "--model", "tiny-gpt2", "--backend", "ray", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install 'splitlora[ray]'" in err


def test_client_actors_fit_the_cluster():
    """Without --ray-actors, as many client actors as the cluster holds; the clients queue on them."""
    from splitlora.simulation.ray_backend import fitting_actors

    defaults = RayOptions(backend="ray")  # 1 CPU per client actor, 1 for the server
    assert fitting_actors({"CPU": 2.0}, defaults, 3) == 1
    assert fitting_actors({"CPU": 16.0}, defaults, 3) == 3
    assert fitting_actors({"CPU": 4.0}, _options(), 8) == 7
    assert fitting_actors({"CPU": 8.0, "GPU": 2.0}, RayOptions(backend="ray", client_gpus=0.5, server_gpus=1.0), 5) == 2
    assert RayOptions(backend="ray", actors=2).clients_per_actor(3) == [[0], [1, 2]]
    assert RayOptions(backend="ray").clients_per_actor(1) == [[0]]
    assert RayOptions(backend="ray").clients_per_actor(3, fitting_actors({"CPU": 2.0}, defaults, 3)) == [[0, 1, 2]]
