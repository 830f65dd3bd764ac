"""Malicious clients over gRPC, operations: a full disk at a checkpoint, a second server on the port,
forged log lines. Helpers: tests/attack_wire.py."""

from attack_wire import *  # noqa: F403 - the shared helpers and fixtures of the attack tests


# ==== 5. disk full at a checkpoint ===========================================================================

@pytest.mark.parametrize("when", ["mid-run", "last"])
def test_disk_full_at_a_checkpoint(tmp_path, csvs, solo, later, monkeypatch, caplog, when):
    """Finding 5: ENOSPC at a checkpoint (simulated: the checkpoint writer raises it). The server stops
    with a one-line error (UserError: exit code 2), tells the client, releases its port; the previous
    checkpoint stands and metrics.jsonl has no `checkpoint` event for the failed one.
    mid-run (step 4 of 6; from then on every file write fails, the adapter's too): the client hears
    that the server stopped, waits for it to come back (serve --resume) for its reconnect timeout and
    then exits with a one-line error. last (step 6 of 6, only the checkpoint fails): the run is over,
    the client exits normally, and the adapter (the finished work) is saved, the honest one alone."""
    from splitlora.errors import UserError
    from splitlora.runtime.checkpoint import load_checkpoint
    from splitlora.transport import serve as serve_mod

    caplog.set_level(logging.INFO, logger="splitlora.transport.remote_client")
    cfg = attack_config(steps=6)
    alone = solo(cfg) if when == "last" else None  # before the disk fills
    fail_at = 4 if when == "mid-run" else 6
    real_save = serve_mod.save_checkpoint

    def save(directory, state):
        if state["step"] >= fail_at:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(directory, state)

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(serve_mod, "save_checkpoint", save)
    if when == "mid-run":
        monkeypatch.setattr(serve_mod, "save_adapter", no_space)
    server = start_server(cfg, tmp_path / "server", later, join_timeout=SOLO_JOIN)
    port = server.port
    errors, results = [], []
    start = time.monotonic()
    honest = start_honest(server, csvs[1], later, errors, reconnect_timeout=4.0, results=results)
    server.thread.join(RUN_TIMEOUT)
    honest.join(RUN_TIMEOUT)
    assert not server.thread.is_alive() and not honest.is_alive()
    assert isinstance(server.error, UserError), server.error
    assert f"cannot write the checkpoint at step {fail_at}" in str(server.error)
    assert "the one at step" in str(server.error)
    # The port is free again: a new server binds it (no SO_REUSEPORT, so it would fail if held).
    probe = grpc.server(futures_pool(), options=[("grpc.so_reuseport", 0)])
    assert probe.add_insecure_port(f"127.0.0.1:{port}") == port
    probe.stop(None)
    # The previous checkpoint stands; no event for the failed one; metrics.jsonl is strict JSON.
    out = tmp_path / "server"
    assert load_checkpoint(out / "checkpoint")["step"] == fail_at - 2
    records = read_records(out)
    assert [e["step"] for e in events(records, "checkpoint")] == list(range(2, fail_at, 2))
    told = [r.getMessage() for r in caplog.records if "the server says" in r.getMessage()]
    assert told and "checkpoint" in told[0], told
    if when == "mid-run":
        assert len(errors) == 1 and "cannot reach the server" in str(errors[0]), errors
        assert "cannot save the adapter" in str(server.error)
        assert time.monotonic() - start < RUN_TIMEOUT
    else:
        assert not errors and results[0].finished, errors
        assert "the run finished and its adapter is in" in str(server.error)
        diff = max_abs_diff(adapter(out / "adapter"), alone)
        print(f"\nfinal checkpoint failed: max |adapter saved - adapter(honest client alone)| = {diff:.3g}")
        assert diff == 0


def futures_pool():
    from concurrent import futures

    return futures.ThreadPoolExecutor(max_workers=1)


# ==== 6, 7. processes: port sharing, log lines ===================================================================

@pytest.mark.slow  # two real `splitlora serve` processes and a `client` one
def test_a_second_server_cannot_take_the_port(tmp_path, csvs, solo):
    """Finding 6: a second `splitlora serve` on the port of a running one refuses to start (exit 2,
    one line) instead of sharing it (SO_REUSEPORT) and taking some of its clients; the first one's run
    finishes with its honest client (exit 0), and its adapter is the honest client's alone."""
    from splitlora.transport.loopback import Loopback

    cfg = attack_config()
    with Loopback(cfg, csvs, tmp_path / "a") as a, Loopback(cfg, csvs, tmp_path / "b") as b:
        a.start_server("--join-timeout", "90", "--client-timeout", "20", "--poll-interval", "1", "--linger", "1")
        endpoint = a.endpoint()
        # The first server holds its port until its run ends, and its run waits for client 1, which
        # starts only once the second server gave up. (Client 0 joins, then leaves when asked to work.)
        attacker = Raw(int(endpoint.rsplit(":", 1)[1]), lambda fn: None, token=a.tokens[ATTACKER])
        try:
            attacker.hello()
            b.start_server(listen=endpoint)
            assert b.wait(b.server, 60, "second server") == 2, b.tail("server.log")
            assert f"error: cannot listen on {endpoint}" in b.tail("server.log")
            a.start_client(1, "--reconnect-timeout", "60", endpoint=endpoint)
            attacker.asked("forward")
            attacker.stub.Leave(pb.Done(session=attacker.session), metadata=attacker.md, timeout=30)
        finally:
            attacker.channel.close()
        assert a.wait(a.server, RUN_TIMEOUT, "first server") == 0, a.tail("server.log")
        assert a.wait(a.clients[1], 30, "client") == 0, a.tail(a.client_log(1))
        assert sorted(e["client"] for e in events(a.metrics(), "join")) == [ATTACKER, HONEST]
        diff = max_abs_diff(adapter(a.server_dir / "adapter"), solo(cfg))
    print(f"\nsecond server on the same port: exit 2; max |adapter(first server) - adapter(honest alone)| = {diff:.3g}")
    assert diff == 0


@pytest.mark.slow  # a real `splitlora serve` process and a `client` one
def test_leave_reason_cannot_forge_log_lines(tmp_path, csvs, solo):
    """Finding 7: a Leave reason with newlines, a carriage return and terminal escapes is logged on one
    line, escaped; no forged line appears in the server's log. The run goes on with the honest
    client (exit 0), whose adapter is its own alone."""
    from splitlora.transport.loopback import Loopback

    cfg = attack_config()
    forged = "ERROR splitlora.transport.server: client 1 dropped at step 0: forged"
    reason = f"bye\n{forged}\r\x1b[2K{forged}\u2028{forged}"
    with Loopback(cfg, csvs, tmp_path / "lb") as lb:
        lb.start_server("--join-timeout", "60", "--client-timeout", "20", "--poll-interval", "1", "--linger", "1")
        endpoint = lb.endpoint()
        attacker = Raw(int(endpoint.rsplit(":", 1)[1]), lambda fn: None, token=lb.tokens[ATTACKER])
        try:
            attacker.hello()
            lb.start_client(1, "--reconnect-timeout", "60", endpoint=endpoint)
            attacker.asked("forward")
            attacker.stub.Leave(pb.Done(session=attacker.session, error=reason), metadata=attacker.md, timeout=30)
        finally:
            attacker.channel.close()
        assert lb.wait(lb.server, RUN_TIMEOUT, "server") == 0, lb.tail("server.log")
        assert lb.wait(lb.clients[1], 30, "client") == 0, lb.tail(lb.client_log(1))
        log_text = (lb.root / "server.log").read_text()
        (drop,) = [e for e in events(lb.metrics(), "drop") if e["client"] == ATTACKER]
        diff = max_abs_diff(adapter(lb.server_dir / "adapter"), solo(cfg))
    lines = log_text.splitlines()
    assert not [line for line in lines if forged in line and not line.startswith("WARNING")]
    (line,) = [line for line in lines if "left with an error" in line]
    assert line.startswith("WARNING splitlora.transport.server: client 0 dropped")
    assert "bye\\nERROR" in line and "\\r\\x1b[2K" in line and "\\u2028" in line
    assert drop["reason"].startswith("left with an error: bye\\nERROR")
    print(f"\nforged log lines: {line[:90]}...; max |adapter - adapter(honest alone)| = {diff:.3g}")
    assert diff == 0
