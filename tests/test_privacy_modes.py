"""--privacy presets: each one a valid config that turns on what docs/privacy.md says it does."""

import pytest


def _resolve(*argv):
    from splitlora.cli import build_parser, resolve_config

    return resolve_config(build_parser().parse_args(["train", "--model", "tiny-gpt2", *argv]))


def test_each_preset_is_a_valid_config_with_its_protection():
    from splitlora.privacy.presets import PRESETS

    for name in PRESETS:
        _resolve("--privacy", name)
    assert _resolve("--privacy", "trusted-server") == _resolve()
    assert _resolve("--privacy", "private-labels").u_shape
    assert _resolve("--privacy", "private-updates").privacy.secure_aggregation
    records = _resolve("--privacy", "private-records").privacy
    assert records.dp_sgd and records.dp_noise_multiplier > 0 and not records.secure_aggregation
    untrusted = _resolve("--privacy", "untrusted-server")
    assert untrusted.algorithm == "fed" and untrusted.privacy.secure_aggregation and untrusted.privacy.dp_sgd
    assert untrusted.privacy.dp_poisson


def test_flags_override_the_preset_and_bad_names_are_one_line_errors():
    from splitlora.errors import UserError

    assert _resolve("--privacy", "private-records", "--dp-noise", "3.0").privacy.dp_noise_multiplier == 3.0
    assert _resolve("--algorithm", "fed", "--secure-aggregation").privacy.secure_aggregation
    assert not _resolve("--algorithm", "fed").privacy.secure_aggregation
    with pytest.raises(UserError):
        _resolve("--privacy", "everything-private")
    with pytest.raises(UserError):  # secure aggregation has nothing to aggregate in sl
        _resolve("--privacy", "private-updates", "--algorithm", "sl")
