"""The canary audit (privacy/canary.py): a memorised canary ranks first; DP-SGD pushes it down."""

from conftest import tiny_config


def test_rank_and_exposure():
    from splitlora.privacy.canary import rank_and_exposure

    assert rank_and_exposure(-1.0, [-5.0, -3.0, -2.0]) == (1, 2.0)
    rank, exposure = rank_and_exposure(-4.0, [-5.0, -3.0, -2.0])
    assert rank == 3 and abs(exposure - (2.0 - 1.584962500721156)) < 1e-9


def test_canary_ranks_first_without_dp_and_lower_with_it(tmp_path, tiny_gpt2):
    from splitlora.privacy.canary import CanaryOptions, run_canary_audit

    # A site whose data is mostly the canaries, repeated: the tiny random model memorises them in a few steps.
    opts = CanaryOptions(canaries=2, repeats=6, candidates=50)
    # FedAvg's norm bound off: with 2 sites it clips the canary site's (larger) update to 1.5x the other's,
    # which damps memorisation too; the audit measures what DP-SGD does, so the average is the plain one.
    base = dict(algorithm="fed", clients=2, steps=15, batch_size=4, synthetic_examples=12, max_length=48,
                lr=0.03, warmup_steps=0, aggregate_every=5,
                aggregation={"max_update_ratio": 0, "max_weight_ratio": 0})
    plain = run_canary_audit(tiny_config(**base), tmp_path / "plain", opts, loaded=tiny_gpt2, progress=False)
    private = run_canary_audit(tiny_config(**base, privacy={"dp_clip_norm": 0.05, "dp_noise_multiplier": 1.0}),
                               tmp_path / "dp", opts, loaded=tiny_gpt2, progress=False)
    assert [r["rank"] for r in plain["canaries"]] == [1, 1]
    assert all(r["rank"] > 3 for r in private["canaries"])
    assert private["mean_exposure"] < plain["mean_exposure"] - 1.5
    assert private["epsilon_sites"] and (tmp_path / "dp" / "canary.json").is_file()
