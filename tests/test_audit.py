"""The leakage audit attacks what the server of a run really received, against the victims' real batches."""

import pytest
from conftest import tiny_config

from splitlora.errors import UserError
from splitlora.privacy.audit import AuditOptions, run_audit

OPTS = dict(max_batches=2, attacker_examples=120, label_examples=60, epochs=2, bleu_mrs=0)


def test_two_part_leaks_labels_and_shallow_activations(tmp_path, tiny_gpt2):
    """On the two-part split the labels are in the message (100%); on a random 64-wide model the
    activations at cut 1 are a near-linear image of the embeddings, so least squares inverts them.
    A wrong alignment of recorded messages with the victims' batches could not score this high."""
    cfg = tiny_config(cut_layer=1, steps=4, clients=2)
    row = run_audit(cfg, tmp_path, AuditOptions(**OPTS), loaded=tiny_gpt2, progress=False)
    assert row["label_accuracy"] == 1.0 and row["label_source"] == "the labels in the message"
    assert row["recorded_batches"] == 4 and row["attacked_tokens"] > 100
    assert row["token_accuracy"] > 0.95 and row["rouge_l"] > 0.9
    assert row["token_accuracy"] == max(row["least_squares_token_accuracy"], row["learned_token_accuracy"])
    assert row["epsilon_token_run"] is None  # no noise, no guarantee
    assert (tmp_path / "audit.json").is_file() and (tmp_path / "run" / "adapter").is_dir()


def test_u_shape_with_noise_is_attacked_through_its_gradients(tmp_path, tiny_gpt2):
    cfg = tiny_config(cut_layer=2, steps=4, clients=2, split_shape="u-shape", tail_layers=1,
                      privacy={"clip_norm": 1.0, "noise_multiplier": 0.5})
    row = run_audit(cfg, tmp_path, AuditOptions(**OPTS), loaded=tiny_gpt2, progress=False)
    assert row["label_source"].startswith("gradients")
    assert 0.0 <= row["label_accuracy"] < 0.9  # noise of std 0.5 per coordinate on unit-norm tokens
    assert row["token_accuracy"] < 0.5
    assert row["epsilon_token_release"] < row["epsilon_token_run"] < float("inf")


def test_audit_refuses_what_it_cannot_attack(tmp_path, tiny_gpt2, tmp_path_factory):
    with pytest.raises(UserError, match="no activations leave"):
        run_audit(tiny_config(algorithm="fed"), tmp_path, AuditOptions(**OPTS), loaded=tiny_gpt2, progress=False)
    data = tmp_path / "victims.csv"
    data.write_text("mr,ref\n" + "".join(f'"name[A{i}]",A{i} is a pub.\n' for i in range(30)))
    with pytest.raises(UserError, match="must not be the victims"):
        run_audit(tiny_config(data=str(data)), tmp_path / "o", AuditOptions(**{**OPTS, "attacker_data": str(data)}),
                  loaded=tiny_gpt2, progress=False)
