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


@pytest.fixture(scope="session")
def tiny_gpt2():
    from splitlora.models.loading import load_model

    return load_model("tiny-gpt2")
