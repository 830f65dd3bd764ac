"""Data: E2E loading, prompt/completion labels, dynamic padding, partitions."""

from collections import Counter

import numpy as np
import pytest

from splitlora.data.batching import IGNORE, BatchStream, collate, encode, encode_all
from splitlora.data.e2e import Example, load_e2e, read_e2e_csv, synthetic_e2e
from splitlora.data.partition import partition
from splitlora.errors import UserError


def test_real_e2e_files(e2e_dir):
    dev = read_e2e_csv(e2e_dir / "devset.csv")
    assert len(dev) == 4672
    assert len({ex.mr for ex in dev}) == 547
    assert dev[0].slots()["name"]
    folder = load_e2e(e2e_dir)  # a folder: its training CSVs, never the test set
    assert folder == dev


def test_loss_on_completion_only(tiny_gpt2):
    tok = tiny_gpt2.tokenizer
    ex = Example("name[The Eagle], eatType[pub]", "The Eagle is a pub.")
    enc = encode(ex, tok, "{mr}\nDescription:", 128)
    prompt_len = len(tok("name[The Eagle], eatType[pub]\nDescription:", add_special_tokens=False)["input_ids"])
    assert enc.labels[:prompt_len] == [IGNORE] * prompt_len
    assert enc.labels[prompt_len:] == enc.input_ids[prompt_len:]
    assert enc.input_ids[-1] == tok.eos_token_id
    assert tok.decode(enc.input_ids[prompt_len:-1]) == " The Eagle is a pub."
    assert len(encode(ex, tok, "{mr}\nDescription:", 5).input_ids) == 5


def test_dynamic_padding(tiny_gpt2):
    items = encode_all(synthetic_e2e(8), tiny_gpt2.tokenizer, "{mr} ||", 512)
    batch = collate(items[:3], pad_id=0)
    longest = max(len(it.input_ids) for it in items[:3])
    assert batch["input_ids"].shape == (3, longest) and longest < 512
    for row, it in enumerate(items[:3]):
        n = len(it.input_ids)
        assert batch["attention_mask"][row].sum() == n
        assert (batch["labels"][row, n:] == IGNORE).all()


def test_stream_is_seeded_and_covers_each_epoch(tiny_gpt2):
    items = encode_all(synthetic_e2e(10), tiny_gpt2.tokenizer, "{mr} ||", 64)
    a = BatchStream(items, 3, 0, seed=(0, 1))
    b = BatchStream(items, 3, 0, seed=(0, 1))
    first_epoch = [next(a) for _ in range(4)]  # 3 + 3 + 3 + 1
    assert sum(x["input_ids"].shape[0] for x in first_epoch) == 10
    assert all((x["input_ids"] == next(b)["input_ids"]).all() for x in first_epoch)


@pytest.mark.parametrize("spec", ["iid", "contiguous", "dirichlet:0.3", "dirichlet:100"])
def test_partition_is_a_cover(spec):
    keys = ["pub", "restaurant", "coffee shop"] * 40
    parts = partition(len(keys), 4, spec, seed=0, key_of=lambda i: keys[i])
    flat = [i for p in parts for i in p]
    assert sorted(flat) == list(range(len(keys)))
    assert all(p and p == sorted(p) for p in parts)


def test_contiguous_and_dirichlet_skew():
    parts = partition(10, 3, "contiguous", seed=0)
    assert parts == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]
    keys = ["a", "b", "c", "d"] * 100

    def skew(spec):
        parts = partition(len(keys), 4, spec, seed=1, key_of=lambda i: keys[i])
        # mean over clients of the share of its most common key (0.25 = perfectly mixed)
        return np.mean([Counter(keys[i] for i in p).most_common(1)[0][1] / len(p) for p in parts])

    assert skew("dirichlet:0.1") > 0.6 > skew("dirichlet:1000")


def test_partition_errors():
    with pytest.raises(UserError):
        partition(2, 3, "iid", seed=0)
    with pytest.raises(UserError):
        partition(10, 2, "bogus", seed=0)
