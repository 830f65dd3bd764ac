"""Malicious clients over gRPC: poisoned FedAvg uploads, sample-count claims, sl hand-overs.
Helpers: tests/attack_wire.py; the bounded-influence measurements are in test_attacks_influence.py."""

from attack_wire import *  # noqa: F403 - the shared helpers and fixtures of the attack tests


# ==== 2, 3. poisoned FedAvg, sample counts =================================================================

def test_fedavg_refuses_an_upload_beyond_the_value_bound(tmp_path, csvs, solo, later):
    """Finding 2: an adapter of all 1e30 (finite) is refused on arrival; its sender is dropped; the
    average, the adapter and the checkpoint are the honest client's alone."""
    cfg = attack_config(algorithm="fed")
    server = start_server(cfg, tmp_path / "server", later)
    errors, attacker_errors = [], []
    tampering_client(server.port, csvs[0], later, attacker_errors, fill_upload(1e30))
    honest = start_honest(server, csvs[1], later, errors)
    finish(server, honest, errors)
    (reason,) = drops(tmp_path / "server")
    assert "invalid Upload reply" in reason and "exceeds the bound" in reason
    assert [e["used"] for e in events(read_records(tmp_path / "server"), "aggregate")] == [[HONEST], [HONEST]]
    finite_outputs(tmp_path / "server")
    assert same_as_solo(server, solo, "fed, an upload of all 1e30") == 0


@pytest.mark.parametrize("outliers", ["reject", "clip"])
def test_fedavg_outlier_upload_is_flagged_and_bounded(tmp_path, csvs, solo, later, monkeypatch, outliers):
    """Finding 2: an adapter of all 10.0 (inside the value bound; honest values stay below 1) in every
    round. reject: it is left out of every average (`rejected`), the adapter is the honest one alone.
    clip: its change is scaled to the bound (`clipped`) and the average is exactly the documented
    rule's; no value near 10 reaches the adapter or the checkpoint."""
    seen = capture_aggregations(monkeypatch)
    cfg = attack_config(algorithm="fed", aggregation={"outliers": outliers})
    server = start_server(cfg, tmp_path / "server", later)
    errors, attacker_errors = [], []
    attacker = tampering_client(server.port, csvs[0], later, attacker_errors, fill_upload(10.0))
    honest = start_honest(server, csvs[1], later, errors)
    finish(server, honest, errors)
    attacker.join(30)
    assert not attacker_errors, attacker_errors  # it stays in the run: its uploads are well-formed
    aggs = events(read_records(tmp_path / "server"), "aggregate")
    assert len(aggs) == len(seen) == 2
    key = "rejected" if outliers == "reject" else "clipped"
    assert all(e.get(key) == [ATTACKER] for e in aggs), aggs
    assert all(e["used"] == ([HONEST] if outliers == "reject" else [ATTACKER, HONEST]) for e in aggs)
    final = adapter(server.result.adapter_dir)
    for uploads, current, rules, out in seen:
        assert same_rule(out, documented_fedavg(uploads, current, rules))
    last = {"base_model.model." + k: v for k, v in seen[-1][3].state.items()}
    assert final.keys() == last.keys() and all(torch.equal(final[k], last[k]) for k in final)
    ckpt = checkpoint_state(tmp_path / "server")["algorithm"]["global_state"]
    assert all(torch.equal(ckpt[k], seen[-1][3].state[k]) for k in ckpt)
    worst = max(float(v.abs().max()) for v in final.values())
    print(f"\nfed, uploads of all 10.0, {outliers}: largest |value| in the adapter {worst:.3g}; "
          f"documented rule reproduced exactly in {len(seen)} rounds")
    assert worst < 1.0
    if outliers == "reject":
        assert same_as_solo(server, solo, "fed, uploads of all 10.0, rejected") == 0


def test_sample_counts_are_capped(tmp_path, csvs, later, monkeypatch):
    """Finding 3: a Hello above 2^40 samples is refused; a declared 2^40 is capped at
    max_samples_per_client (logged as `capped`), and the average is exactly the documented rule's."""
    seen = capture_aggregations(monkeypatch)
    cfg = attack_config(algorithm="fed")
    server = start_server(cfg, tmp_path / "server", later)
    raw = Raw(server.port, later)
    assert raw.code(lambda: raw.hello(num_samples=(1 << 40) + 1)) == grpc.StatusCode.INVALID_ARGUMENT
    errors, attacker_errors = [], []
    attacker = tampering_client(server.port, csvs[0], later, attacker_errors, declare=1 << 40)
    honest = start_honest(server, csvs[1], later, errors)
    finish(server, honest, errors)
    attacker.join(30)
    assert not attacker_errors, attacker_errors
    aggs = events(read_records(tmp_path / "server"), "aggregate")
    rules = cfg.aggregation
    # Capped at max_samples_per_client, then at max_weight_ratio times the lower median claim (the honest one's).
    cap = int(min(rules.max_samples_per_client, rules.max_weight_ratio * min(e["samples"][1] for e in aggs)))
    assert all(e["capped"] == {ATTACKER: 1 << 40} and e["samples"][0] == cap for e in aggs), aggs
    for uploads, current, rules, out in seen:
        assert [d for _, _, d, _ in uploads][0] == 1 << 40
        assert same_rule(out, documented_fedavg(uploads, current, rules))
    final = adapter(server.result.adapter_dir)
    last = seen[-1][3].state
    assert all(torch.equal(final["base_model.model." + k], last[k]) for k in last)
    print(f"\nfed, 2^40 samples declared: weight capped at {cap}, documented rule reproduced exactly")


def test_upload_with_another_sample_count_is_refused(tmp_path, csvs, solo, later):
    """Finding 3: an upload whose sample count (2^40) is not the one the client declared in Hello is
    refused and its sender dropped; the adapter is the honest one alone."""
    def inflate(command, reply):
        if isinstance(reply, AdapterUpdate):
            reply.num_samples = 1 << 40
        return reply

    cfg = attack_config(algorithm="fed")
    server = start_server(cfg, tmp_path / "server", later)
    errors, attacker_errors = [], []
    tampering_client(server.port, csvs[0], later, attacker_errors, inflate)
    honest = start_honest(server, csvs[1], later, errors)
    finish(server, honest, errors)
    (reason,) = drops(tmp_path / "server")
    assert "announced in Hello" in reason
    assert same_as_solo(server, solo, "fed, an upload claiming 2^40 samples") == 0





# ==== beyond the issue: sl hand-overs ==========================================================================

def test_sl_handover_with_forged_moments_is_refused(tmp_path, csvs, later):
    """sl: the turn's client hands back its adapter with AdamW's moments; the next client continues
    from them. Forged moments inside the value bound (exp_avg 1e10, exp_avg_sq 0: no AdamW makes them)
    are refused on arrival and their sender dropped; the server keeps its copy. They were accepted,
    checkpointed and handed on: the next (honest) client's adapter blew up and it was dropped."""
    from splitlora.transport.wire import MOMENT_RATIO

    cfg = attack_config(algorithm="sl")
    server = start_server(cfg, tmp_path / "server", later)
    errors, attacker_errors = [], []

    def forge(command, reply):
        if isinstance(reply, Handover):
            reply.exp_avg = {k: torch.full_like(v, 1e10) for k, v in reply.exp_avg.items()}
            reply.exp_avg_sq = {k: torch.zeros_like(v) for k, v in reply.exp_avg_sq.items()}
        return reply

    tampering_client(server.port, csvs[0], later, attacker_errors, forge)
    honest = start_honest(server, csvs[1], later, errors)
    finish(server, honest, errors)
    reasons = drops(tmp_path / "server")
    assert reasons and all("invalid HandOut reply" in r and "first moments" in r for r in reasons), reasons
    assert set(drops(tmp_path / "server", HONEST)) <= {"left"}
    finite_outputs(tmp_path / "server")
    h = checkpoint_state(tmp_path / "server")["algorithm"]["handover"]
    assert all(bool((h["exp_avg"][k] ** 2 <= MOMENT_RATIO * h["exp_avg_sq"][k] + 1e-30).all()) for k in h["exp_avg"])
    assert max(float(v.abs().max()) for v in adapter(server.result.adapter_dir).values()) < 1.0
