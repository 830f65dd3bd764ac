"""Malicious clients over gRPC: freezing or stalling everyone (half-sent calls, call storms, busy
refusals, a client holding every barrier). Helpers: tests/attack_wire.py."""

from attack_wire import *  # noqa: F403 - the shared helpers and fixtures of the attack tests


# ==== 4. freezing everyone: half-sent calls, call storms ======================================================

class Flood:
    """Calls of one kind, kept open (or repeated) from many threads until :meth:`stop`; records how each ended."""

    def __init__(self, port: int, later, method: str, metadata, threads: int, half_sent: bool, pause: float = 0.0):
        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        self.stop_event = threading.Event()
        later(self.stop)
        path = f"/splitlora.v2.SplitLoRA/{method}"
        if method == "Leave":  # unary on the wire; stream-unary here so that it can stay half-sent
            self.call = self.channel.stream_unary(path, request_serializer=pb.Done.SerializeToString,
                                                  response_deserializer=pb.Ack.FromString)
            self.first = None if half_sent else pb.Done(session=12345)
        else:
            self.call = self.channel.stream_stream(path, request_serializer=pb.Chunk.SerializeToString,
                                                   response_deserializer=pb.Chunk.FromString)
            msg = (pb.HelloRequest(protocol_version=PROTOCOL_VERSION, num_samples=5) if method == "Hello"
                   else pb.ClientMessage(session=12345))
            data = msg.SerializeToString()
            # Half-sent: the first chunk announces more bytes than ever come.
            self.first = (pb.Chunk(data=data, total_bytes=len(data) + 1000) if half_sent
                          else pb.Chunk(data=data, total_bytes=len(data)))
        self.unary, self.half_sent, self.metadata, self.pause = method == "Leave", half_sent, metadata, pause
        self.outcomes: list[tuple[grpc.StatusCode, float]] = []
        self.details: set = set()
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._loop, daemon=True) for _ in range(threads)]
        for t in self.threads:
            t.start()

    def _requests(self):
        if self.first is not None:
            yield self.first
        if self.half_sent:
            self.stop_event.wait(60)  # ... and nothing more

    def _loop(self):
        while not self.stop_event.is_set():
            start = time.monotonic()
            try:
                if self.unary:
                    self.call(self._requests(), metadata=self.metadata, timeout=60)
                else:
                    for _ in self.call(self._requests(), metadata=self.metadata, timeout=60):
                        pass
                code = grpc.StatusCode.OK
            except grpc.RpcError as exc:
                code = exc.code()
                if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
                    self.details.add(exc.details())
            with self.lock:
                self.outcomes.append((code, time.monotonic() - start))
            if self.pause:
                self.stop_event.wait(self.pause)

    def codes(self) -> dict[grpc.StatusCode, int]:
        with self.lock:
            out: dict = {}
            for code, _ in self.outcomes:
                out[code] = out.get(code, 0) + 1
            return out

    def stop(self):
        self.stop_event.set()
        for t in self.threads:
            t.join(30)
        self.channel.close()


@pytest.mark.parametrize("method,token", [("Exchange", "valid"), ("Hello", "valid"), ("Leave", "valid"),
                                          ("Leave", "wrong")])
def test_half_sent_calls_do_not_freeze_the_server(tmp_path, csvs, solo, later, method, token):
    """Finding 4: 24 half-sent calls at a time (more than the server's worker threads), reopened as soon as
    they end, for the whole run. At most ``calls_per_client`` (2) of them are held, each for at most
    ``read_timeout``; the others are refused at once. The honest client trains as if alone.
    (Half-sent unary Leave calls, even with a wrong token, used to hold every worker without a deadline.)"""
    cfg = attack_config()
    server = start_server(cfg, tmp_path / "server", later, join_timeout=SOLO_JOIN)
    metadata = md(ATTACKER) if token == "valid" else md(ATTACKER, "a-wrong-token-" + "z" * 20)
    flood = Flood(server.port, later, method, metadata, threads=24, half_sent=True, pause=0.05)
    errors = []
    honest = start_honest(server, csvs[1], later, errors)
    finish(server, honest, errors)
    flood.stop()
    codes = flood.codes()
    print(f"\n{method} ({token} token), half-sent: {codes}")
    held = [t for c, t in flood.outcomes if c in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED)]
    if token == "valid":
        assert codes.get(grpc.StatusCode.RESOURCE_EXHAUSTED, 0) > 24  # refused at once, over and over
        assert held and max(held) < FAST["read_timeout"] + 3  # cut after read_timeout
    else:
        assert codes[grpc.StatusCode.UNAUTHENTICATED] > 24  # refused at once, unread
        # (UNAVAILABLE, CANCELLED: calls the server's end cut)
        assert set(codes) - {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED} == {grpc.StatusCode.UNAUTHENTICATED}
    assert same_as_solo(server, solo, f"24 half-sent {method} calls at a time ({token} token)") == 0


@pytest.mark.parametrize("method", ["Hello", "Exchange", "Leave"])
def test_call_storm_does_not_knock_out_the_honest_client(tmp_path, csvs, solo, later, method):
    """A token holder calls as fast as it can from 64 threads for the whole run (complete, tiny calls:
    polls with a stale session, Hellos, Leaves). The honest client trains as if alone."""
    cfg = attack_config()
    server = start_server(cfg, tmp_path / "server", later, join_timeout=SOLO_JOIN)
    flood = Flood(server.port, later, method, md(ATTACKER), threads=64, half_sent=False)
    errors, results = [], []
    honest = start_honest(server, csvs[1], later, errors, results=results)
    finish(server, honest, errors)
    flood.stop()
    print(f"\n{method} storm: {flood.codes()}; honest client rejoined {results[0].rejoins} times, "
          f"dropped for {drops(tmp_path / 'server', HONEST)}")
    assert sum(flood.codes().values()) > 100
    assert results[0].rejoins == 0 and set(drops(tmp_path / "server", HONEST)) <= {"left"}
    assert same_as_solo(server, solo, f"{method} storm from 64 threads") == 0


def test_busy_refusals_cost_the_honest_client_nothing(tmp_path, csvs, solo, later, monkeypatch):
    """The storm above, made certain: gRPC refuses every other call of the honest client with
    RESOURCE_EXHAUSTED ("Concurrent RPC limit exceeded!", what a flood of calls from another client
    gets it). The refused call is unread, so the client sends it again; it used to say Hello again
    instead, which cost it its step and, flood after flood, its place in the run."""
    from splitlora.transport import service

    class Crowded(service.TokenInterceptor):
        calls = 0

        def intercept_service(self, continuation, details):
            handler = super().intercept_service(continuation, details)
            name = dict(details.invocation_metadata or ()).get("splitlora-client-id")
            if name == HONEST and not details.method.endswith("/Leave"):
                Crowded.calls += 1
                if Crowded.calls % 2 == 0:
                    def refuse(request_iterator, context):
                        context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "Concurrent RPC limit exceeded!")
                    return grpc.stream_stream_rpc_method_handler(refuse)
            return handler

    monkeypatch.setattr(service, "TokenInterceptor", Crowded)
    cfg = attack_config()
    server = start_server(cfg, tmp_path / "server", later, join_timeout=SOLO_JOIN)
    errors, results = [], []
    honest = start_honest(server, csvs[1], later, errors, results=results)
    finish(server, honest, errors)
    assert Crowded.calls > 10
    assert results[0].rejoins == 0 and set(drops(tmp_path / "server", HONEST)) <= {"left"}
    assert same_as_solo(server, solo, "every other call of the honest client refused as busy") == 0


def test_client_holding_every_barrier_is_dropped_at_the_others_pace(tmp_path, csvs, solo, later):
    """A client that answers every command just before --client-timeout (4 s here) used to hold every
    step's barrier that long, unpunished (216x the honest wall time over 4 steps). The straggler rule
    drops it once its reply is later than straggler_floor + straggler_factor x the lower median of the
    run's recent answer times; it may rejoin at a round boundary and is dropped again at its first stall.
    The run finishes with the honest client's adapter alone (the attacker's work never got in)."""
    cfg = attack_config()
    timeout = 4.0  # not FAST's 10 s: the attacker's stalls (and its thread's last one, at teardown) are waited out
    stall = 0.9 * timeout

    def hold(command, reply):
        if isinstance(command, Forward):
            time.sleep(stall)
        return reply

    server = start_server(cfg, tmp_path / "server", later, client_timeout=timeout, straggler_factor=2.0,
                          straggler_floor=0.5)
    errors, attacker_errors = [], []
    tampering_client(server.port, csvs[0], later, attacker_errors, hold)
    honest = start_honest(server, csvs[1], later, errors)
    start = time.monotonic()
    finish(server, honest, errors)
    wall = time.monotonic() - start
    reasons = drops(tmp_path / "server")
    assert reasons and all("no answer to Forward" in r and "--straggler-factor" in r for r in reasons), reasons
    assert set(drops(tmp_path / "server", HONEST)) <= {"left"}
    finite_outputs(tmp_path / "server")
    print(f"\nstall of {stall:g}s per Forward: run of {cfg.steps} steps took {wall:.1f}s wall, "
          f"{server.result.seconds:.1f}s of training, attacker dropped {len(reasons)}x")
    assert same_as_solo(server, solo, "a client holding every barrier") == 0


def test_refusal_warnings_are_rate_limited_per_client_and_cause(caplog):
    """A storm of refused calls (4,613 WARNING lines in 35 s before) logs each (client, cause) at its
    1st, 2nd, 4th, 8th, ... occurrence with the count; invented client names beyond max_keys share one."""
    import logging

    from splitlora.transport.throttle import Throttled

    log = logging.getLogger("splitlora.test.throttle")
    caplog.set_level(logging.WARNING, logger=log.name)
    t = Throttled(log, max_keys=3)
    for _ in range(1000):
        t.warning("0", "busy", "refused a call of client %s", "0")
    t.warning("0", "invalid", "invalid from %s", "0")
    for i in range(100):
        t.warning(f"fake{i}", "auth", "refused %s", f"fake{i}")
    lines = [r.getMessage() for r in caplog.records]
    busy = [m for m in lines if m.startswith("refused a call")]
    assert len(busy) == 10 and busy[-1].endswith("[512 times so far]")  # 1, 2, 4, ..., 512
    assert sum(m.startswith("invalid") for m in lines) == 1
    assert len(lines) - 11 <= 1 + 7  # one invented name, then the shared "(others)" count: 1, 2, 4, ..., 64
