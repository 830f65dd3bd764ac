import os
from pathlib import Path

import pytest

# Tests never touch the network: transformers/huggingface_hub read local files only.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One torch thread in every test process and the subprocesses it starts: the thread count can change the
# last bits of a reduction, and tests compare adapters bit for bit across processes (--threads 0 adapts
# to the machine's load, which differs from one process to the next).
os.environ.setdefault("OMP_NUM_THREADS", "1")

REPO = Path(__file__).resolve().parents[1]
E2E_DIR = REPO.parent / "shared" / "data" / "e2e"


@pytest.fixture
def e2e_dir() -> Path:
    if not (E2E_DIR / "devset.csv").is_file():
        pytest.skip("../shared/data/e2e is absent")
    return E2E_DIR


def tiny_config(**overrides):
    """A small, fast run on the tiny GPT-2 preset."""
    from splitlora.config import RunConfig

    base = dict(model="tiny-gpt2", steps=4, batch_size=2, clients=2, cut_layer=2, synthetic_examples=40,
                max_length=48, aggregate_every=2, warmup_steps=1, lr=5e-3, val_fraction=0.1)
    base.update(overrides)
    return RunConfig.from_dict(base)


@pytest.fixture
def no_java(monkeypatch):
    """Score without Java: each METEOR or PTB-tokenizer JVM costs seconds to start (20 s on a loaded
    2-core machine). The Java metrics are checked on real data in test_metrics.py."""
    import shutil

    real = shutil.which
    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: None if name == "java" else real(name, *a, **k))


@pytest.fixture(scope="session")
def tiny_gpt2():
    from splitlora.models.loading import load_model

    return load_model("tiny-gpt2")


def pytest_collection_modifyitems(config, items):
    """``@pytest.mark.cuda`` tests run only where a CUDA GPU is (``splitlora bench gpu`` runs them)."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


def cli_in_process(*args, cwd=None):
    """``splitlora ARGS`` run by ``splitlora.cli.main`` in this process, as a ``CompletedProcess``: the exit
    code main returns, and what it printed. A subprocess costs a fresh interpreter and torch import
    (seconds each); the tests that need the real process (its exit code, signals) start one."""
    import contextlib
    import io
    import subprocess

    from splitlora.cli import main

    out, err = io.StringIO(), io.StringIO()
    here = os.getcwd()
    try:
        if cwd is not None:
            os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main([str(a) for a in args])
            except SystemExit as exc:  # argparse exits on a bad flag
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        os.chdir(here)
    return subprocess.CompletedProcess(list(args), code, out.getvalue(), err.getvalue())
