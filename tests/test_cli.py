"""Bad input: one clear line on stderr, exit code 2, no traceback. And the happy path of train."""

import json
import subprocess
import sys

import pytest
from conftest import cli_in_process


def run_cli(*args, cwd=None, process=False):
    """``splitlora ARGS``: in this process (what ``main`` returns and prints), or as the real command."""
    if not process:
        return cli_in_process(*args, cwd=cwd)
    return subprocess.run([sys.executable, "-m", "splitlora.cli", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=300)


def assert_user_error(proc, *needles):
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr
    for needle in needles:
        assert needle in errors[0], errors[0]


FAST = ["--model", "tiny-gpt2", "--steps", "1", "--batch-size", "2", "--quiet"]


def test_unknown_model(tmp_path):
    assert_user_error(run_cli("train", "--model", "no-such-model", "--out", str(tmp_path)), "unknown model")


def test_missing_model_directory(tmp_path):
    assert_user_error(run_cli("train", "--model", str(tmp_path / "nope"), "--out", str(tmp_path)), "model")


def test_cut_layer_out_of_range(tmp_path):
    assert_user_error(run_cli("train", *FAST, "--cut-layer", "4", "--out", str(tmp_path)), "cut_layer", "1 and 3")
    assert_user_error(run_cli("train", *FAST, "--cut-layer", "0", "--out", str(tmp_path)), "cut_layer")


def test_csv_without_columns(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("meaning,sentence\na,b\n")  # (a `text` column is a valid row shape now)
    assert_user_error(run_cli("train", *FAST, "--data", str(bad), "--out", str(tmp_path / "o")), "'mr' and 'ref'")


def test_empty_data_file(tmp_path):
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    assert_user_error(run_cli("train", *FAST, "--data", str(empty), "--out", str(tmp_path / "o")), "empty")
    header_only = tmp_path / "header.csv"
    header_only.write_text("mr,ref\n")
    assert_user_error(run_cli("train", *FAST, "--data", str(header_only), "--out", str(tmp_path / "o")), "no rows")


@pytest.mark.parametrize("content,needle", [
    ("algorithm: splitlora\nrnak: 8\n", "unknown config key 'rnak'"),
    ("client_lora:\n  rnak: 8\n", "unknown config key 'client_lora.rnak' (did you mean 'client_lora.rank'?)"),
    ("steps: many\n", "steps must be an integer"),
    ("algorithm: magic\n", "algorithm must be one of"),
    ("partition: dirichlet:-1\n", "ALPHA > 0"),
    ("steps: [\n", "not valid YAML"),
])
def test_bad_config_file(tmp_path, content, needle):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(content)
    assert_user_error(run_cli("train", "-c", str(cfg), "--out", str(tmp_path / "o")), needle)


def test_one_converter_reads_yaml_values_and_typed_text():
    """The config file's values and the text of a --set (the benchmarks' and experiments' too) go
    through one converter to the field's type."""
    from splitlora.config import LoraSide, RunConfig, build_dataclass, replace_fields
    from splitlora.errors import UserError

    typed = build_dataclass(RunConfig, {"steps": "3", "lr": "1e-3", "privacy": {"dp_poisson": "yes"},
                                        "client_lora": {"target_modules": "c_attn, c_proj"}})
    assert typed.steps == 3 and typed.lr == 1e-3 and typed.privacy.dp_poisson is True
    assert typed.client_lora.target_modules == ["c_attn", "c_proj"]
    side = replace_fields(LoraSide(), {"rank": "4", "target_modules": "none"}, "client_lora.")
    assert side.rank == 4 and side.target_modules is None
    with pytest.raises(UserError, match=r"^client_lora.alpha must be a number \(got 'big'\)$"):
        replace_fields(LoraSide(), {"alpha": "big"}, "client_lora.")
    with pytest.raises(UserError, match=r"^unknown setting 'client_lora.rnak' \(did you mean 'client_lora.rank'\?\)$"):
        replace_fields(LoraSide(), {"rnak": 4}, "client_lora.")


def test_bad_flag_and_set(tmp_path):
    assert_user_error(run_cli("train", "--steps", "x"), "--steps")
    assert_user_error(run_cli("train", "--set", "nosuchkey=1", "--out", str(tmp_path)), "nosuchkey")
    assert_user_error(run_cli("train", "--set", "novalue", "--out", str(tmp_path)), "key=value")


@pytest.mark.slow  # the real command, in its own interpreter
def test_train_writes_config_metrics_and_adapter(tmp_path):
    out = tmp_path / "run"
    proc = run_cli("train", *FAST, "--steps", "2", "--clients", "2", "--rank", "4", "--set",
                   "synthetic_examples=30", "--out", str(out), process=True)  # the real command, its exit code
    assert proc.returncode == 0, proc.stderr
    assert "adapter:" in proc.stdout
    for name in ("config.yaml", "metrics.jsonl", "metrics.csv", "adapter/adapter_config.json",
                 "adapter/adapter_model.safetensors"):
        assert (out / name).is_file(), name
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["step"] == 1 and rows[0]["loss"] > 0
    # The written config is a valid config file for the next run (and for `serve -c`).
    proc = run_cli("train", "-c", str(out / "config.yaml"), "--steps", "1", "--quiet", "--out", str(tmp_path / "again"))
    assert proc.returncode == 0, proc.stderr
    adapter_cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert adapter_cfg["r"] == 4 and adapter_cfg["peft_type"] == "LORA"
