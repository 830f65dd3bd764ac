"""Malicious clients over gRPC: absurd values, late clients, smaller findings, protocol abuse
(issue 11). Helpers: tests/attack_wire.py."""

from attack_wire import *  # noqa: F403 - the shared helpers and fixtures of the attack tests


# ==== 1. finite but absurd activations ==================================================================

@pytest.mark.parametrize("wire,mode,shape,value", [
    ("fp32", "sequential", "two-part", 3.4e38),
    ("fp32", "batched", "two-part", 3.4e38),
    ("bf16", "sequential", "two-part", 3.0e38),
    ("fp32", "batched", "u-shape", 3.4e38),
])
def test_absurd_activations_are_refused(tmp_path, csvs, solo, later, wire, mode, shape, value):
    """Finding 1: activations of magnitude 3.4e38 (finite) are refused before they reach the model; the
    attacker is dropped, no non-finite value reaches anyone, and the adapter is the honest one alone."""
    extra = {"split_shape": "u-shape", "tail_layers": 1, "cut_layer": 1} if shape == "u-shape" else {}
    cfg = attack_config(wire_dtype=wire, server_mode=mode, **extra)
    server = start_server(cfg, tmp_path / "server", later)
    errors, attacker_errors = [], []

    def absurd(command, reply):
        if isinstance(reply, Activations):
            reply.hidden = torch.full_like(reply.hidden, value)
        return reply

    attacker = tampering_client(server.port, csvs[0], later, attacker_errors, absurd)
    honest = start_honest(server, csvs[1], later, errors)
    finish(server, honest, errors)
    attacker.join(30)
    assert attacker_errors and "INVALID_ARGUMENT" in str(attacker_errors[0])
    (reason,) = drops(tmp_path / "server")
    assert "exceeds the bound" in reason
    finite_outputs(tmp_path / "server")
    assert same_as_solo(server, solo, f"activations of {value:g} ({wire}, {mode}, {shape})") == 0



@pytest.mark.parametrize("mode", ["sequential", "batched"])
def test_absurd_tail_gradient_drops_only_its_sender(tmp_path, csvs, solo, later, mode):
    """Finding 1, U-shape: a tail gradient just inside the value bound (0.99 of it, everywhere) makes the
    server's gradients unusable. Only its sender is dropped, also when the server steps over every
    client's batch at once (batched: it used to drop every client of the step); the adapter is the
    honest one alone."""
    cfg = attack_config(server_mode=mode, split_shape="u-shape", tail_layers=1, cut_layer=1)
    bound = cfg.aggregation.value_bound(64)
    server = start_server(cfg, tmp_path / "server", later)
    errors, attacker_errors = [], []

    def huge(command, reply):
        if isinstance(reply, TailGrad):
            reply.grad = torch.full_like(reply.grad, 0.99 * bound)
        return reply

    tampering_client(server.port, csvs[0], later, attacker_errors, huge)
    honest = start_honest(server, csvs[1], later, errors)
    finish(server, honest, errors)
    reasons = drops(tmp_path / "server")
    assert reasons and all(r == "the server's gradients were not finite" for r in reasons), reasons
    assert set(drops(tmp_path / "server", HONEST)) <= {"left"}  # never dropped (its Leave may come after the end)
    finite_outputs(tmp_path / "server")
    assert same_as_solo(server, solo, f"tail gradients of {0.99 * bound:.3g} (u-shape, {mode})") == 0


# ==== 8f. a client that comes after the end of the run ==========================================================

def test_late_client_learns_that_the_run_is_over(tmp_path, csvs, later):
    """Finding 8: a client started after the end of the run learns that it is over (exit 0, at once)
    while the server lingers, instead of retrying for its whole reconnect timeout."""
    cfg = attack_config(steps=2)
    server = start_server(cfg, tmp_path / "server", later, join_timeout=SOLO_JOIN, linger=8.0)
    errors, late_errors, results = [], [], []
    honest = start_honest(server, csvs[1], later, errors)
    honest.join(RUN_TIMEOUT)
    assert not errors and not honest.is_alive(), errors
    start = time.monotonic()
    late = start_honest(server, csvs[0], later, late_errors, name=ATTACKER, reconnect_timeout=60, results=results)
    late.join(30)
    took = time.monotonic() - start
    assert not late.is_alive() and not late_errors, late_errors
    assert results[0].finished and results[0].steps == 0
    assert took < 10, took
    server.thread.join(30)
    assert server.error is None and server.result.finished




# ==== 8. smaller findings ====================================================================================

def test_batch_without_loss_tokens_is_refused(tmp_path, csvs, solo, later):
    """Finding 8: a batch whose labels are all -100 (its loss would be 0/0 = NaN) is refused and its
    sender dropped; metrics.jsonl stays strict JSON (no NaN); the adapter is the honest one alone."""
    cfg = attack_config()
    server, attacker, honest, errors, forward = raw_attack(cfg, tmp_path, csvs, later)
    acts = activations(0)
    acts.labels.CopyFrom(tensor_to_proto(torch.full((2, 10), -100, dtype=torch.int32)))
    reply = pb.ClientMessage(session=attacker.session, reply_to=forward.id, activations=acts)
    assert attacker.code(lambda: attacker.exchange(reply)) == grpc.StatusCode.INVALID_ARGUMENT
    finish(server, honest, errors)
    (reason,) = drops(tmp_path / "server")
    assert "no loss token" in reason
    finite_outputs(tmp_path / "server")
    assert same_as_solo(server, solo, "a batch whose labels are all -100") == 0


@pytest.mark.parametrize("line,needle", [
    ("alice x", "16 to 512 printable ASCII"),  # 1 character
    ("alice " + "é" * 20, "not all printable ASCII"),
    ("alice " + "a" * 15, "16 to 512"),
    ("\u0430lice " + "a" * 20, "client name"),  # Cyrillic a
    ("\uff41lice " + "a" * 20, "client name"),  # fullwidth a
    ("alice\u200b " + "a" * 20, "client name"),  # zero-width space
    ("alice " + "a" * 20 + "\nalice " + "b" * 20, "listed twice"),
    ("alice " + "a" * 20 + "\nbob " + "a" * 20, "share one token"),
])
def test_token_file_refuses_weak_tokens_and_look_alike_names(tmp_path, capsys, monkeypatch, line, needle):
    """Finding 8 and beyond: 1-character, short and non-ASCII tokens, names with unicode look-alikes
    or invisible characters, duplicates: `serve` refuses the token file (one line, exit 2)."""
    from splitlora import cli

    tokens = tmp_path / "tokens.txt"
    tokens.write_text(line + "\n", encoding="utf-8")
    monkeypatch.setattr(cli, "_EXTRA_COMMANDS", [])
    assert cli.main(["serve", "--token-file", str(tokens), "--clients", "1", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and needle in err[0], err


def test_client_id_look_alike_is_refused():
    from splitlora.config import check_client_name
    from splitlora.errors import UserError

    for name in ("\u0430lice", "alice\u200b", "al ice", "", "a" * 65, "alice\n"):
        with pytest.raises(UserError, match="client name"):
            check_client_name(name, "--client-id")


def test_bom_in_token_files(tmp_path, csvs, solo, later):
    """Finding 8: a byte-order mark at the start of a token file (as some Windows editors write) is not
    part of the first name or token: the server reads its token file, the client its token, and the
    client trains as if the files had none."""
    from splitlora.transport.auth import read_client_token, read_token_file

    server_file, client_file = tmp_path / "tokens.txt", tmp_path / "1.token"
    server_file.write_bytes(b"\xef\xbb\xbf" + "".join(f"{n} {t}\n" for n, t in TOKENS.items()).encode())
    client_file.write_bytes(b"\xef\xbb\xbf" + TOKENS[HONEST].encode() + b"\r\n")
    assert read_token_file(server_file) == TOKENS
    assert read_client_token(client_file) == TOKENS[HONEST]
    cfg = attack_config()
    server = ThreadServer(cfg, tmp_path / "server", read_token_file(server_file),
                          **{**FAST, "join_timeout": SOLO_JOIN})
    later(server.stop)
    errors = []
    honest = start_honest(server, csvs[1], later, errors)
    finish(server, honest, errors)
    assert same_as_solo(server, solo, "token files with a BOM") == 0


def test_tls_failures_stop_the_client_at_once(tmp_path, csvs, solo, later):
    """Finding 8: a client whose TLS handshake fails (a CA that did not sign the server's certificate;
    TLS against a plain-text server) stops within seconds with one line, although its reconnect
    timeout is 60 s; the honest client with the right CA trains as if alone."""
    from deploy_helpers import self_signed_cert

    from splitlora.errors import UserError

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    cert, key, ca = self_signed_cert(tmp_path / "a")
    _, _, other_ca = self_signed_cert(tmp_path / "b")
    cfg = attack_config()
    server = start_server(cfg, tmp_path / "server", later, join_timeout=SOLO_JOIN, tls_cert=cert.read_bytes(),
                          tls_key=key.read_bytes())
    plain = start_server(cfg, tmp_path / "plain", later)
    errors, wrong_ca, tls_to_plain = [], [], []
    start = time.monotonic()
    bad = [start_honest(server, csvs[0], later, wrong_ca, name=ATTACKER, reconnect_timeout=60,
                        tls_ca=other_ca.read_bytes()),
           start_honest(plain, csvs[0], later, tls_to_plain, name=ATTACKER, reconnect_timeout=60,
                        tls_ca=ca.read_bytes())]
    honest = start_honest(server, csvs[1], later, errors, tls_ca=ca.read_bytes())
    for t in bad:
        t.join(30)
    took = time.monotonic() - start
    for errs in (wrong_ca, tls_to_plain):
        assert len(errs) == 1 and isinstance(errs[0], UserError) and "TLS with" in str(errs[0]), errs
    assert took < 20, took
    finish(server, honest, errors)
    print(f"\nTLS failures reported after {took:.1f}s: {str(wrong_ca[0])[:100]} | {str(tls_to_plain[0])[:100]}")
    assert same_as_solo(server, solo, "over TLS, beside clients whose TLS fails") == 0


@pytest.mark.parametrize("valid", ["expired", "not yet valid"])
def test_server_refuses_an_expired_certificate(tmp_path, valid):
    """Finding 8: `serve` refuses an expired (or not yet valid) certificate at start, before it listens."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    from splitlora.config import ServeOptions
    from splitlora.errors import UserError
    from splitlora.transport.serve import serve

    now = datetime.datetime.now(datetime.timezone.utc)
    day = datetime.timedelta(days=1)
    begin, end = (now - 3 * day, now - day) if valid == "expired" else (now + day, now + 3 * day)
    pkey = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    crt = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(pkey.public_key())
           .serial_number(x509.random_serial_number()).not_valid_before(begin).not_valid_after(end)
           .sign(pkey, hashes.SHA256()))
    opts = ServeOptions(tokens=TOKENS, listen="127.0.0.1:0", progress=False, handle_signals=False,
                        tls_cert=crt.public_bytes(serialization.Encoding.PEM),
                        tls_key=pkey.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                   serialization.NoEncryption()))
    with pytest.raises(UserError, match="expired" if valid == "expired" else "not valid before"):
        serve(attack_config(), opts, tmp_path / "server", on_ready=lambda port: pytest.fail("it listened"))


# ==== beyond the issue: protocol abuse ==========================================================================

def _abuse(case: str, attacker: Raw, server, forward: pb.Command):
    """Do ``case``; returns the gRPC code the server answered with, and whether the attacker is still in."""
    if case == "old session":
        old = attacker.session
        attacker.hello()  # a second Hello: a new session, the old one is over
        code = attacker.code(lambda: attacker.exchange(pb.ClientMessage(session=old)))
        return code, True
    if case == "someone else's session":
        theirs = server.grid.members[HONEST].session
        code = attacker.code(lambda: attacker.exchange(pb.ClientMessage(session=theirs)))
        attacker.stub.Leave(pb.Done(session=theirs, error="gone"), metadata=attacker.md, timeout=30)
        return code, True
    if case == "second Hello in the run":
        attacker.hello()
        attacker.asked("forward")  # admitted again at the next round boundary
        return None, True
    if case == "poll while a reply is owed":
        return attacker.code(lambda: attacker.exchange()), False
    if case == "oversized declared size":
        def call():
            chunks = iter([pb.Chunk(data=b"\x08\x01", total_bytes=(1 << 64) - 1)])
            for _ in attacker.stub.Exchange(chunks, metadata=attacker.md, timeout=30):
                pass
        return attacker.code(call), False
    reply = pb.ClientMessage(session=attacker.session, reply_to=forward.id, activations=activations(0))
    if case == "reply to a command not given":
        reply.reply_to = forward.id + 1  # the next command id: the honest client's, or none yet
    elif case == "wrong step":
        reply.activations.step = 1
    elif case == "absurd declared shape":
        reply.activations.hidden.CopyFrom(pb.Tensor(dtype=pb.FLOAT32, shape=[1 << 40, 1 << 40, 64], data=b"\0" * 16))
    return attacker.code(lambda: attacker.exchange(reply)), False


@pytest.mark.parametrize("case,code,reason", [
    ("old session", grpc.StatusCode.ABORTED, "reconnected"),
    ("someone else's session", grpc.StatusCode.ABORTED, "left"),
    ("second Hello in the run", None, "reconnected"),
    ("poll while a reply is owed", grpc.StatusCode.ABORTED, "polled while it owed a reply"),
    ("reply to a command not given", grpc.StatusCode.INVALID_ARGUMENT, "a command it was not given"),
    ("wrong step", grpc.StatusCode.INVALID_ARGUMENT, "the command was for step 0"),
    ("oversized declared size", grpc.StatusCode.INVALID_ARGUMENT, "exceeds the limit"),
    ("absurd declared shape", grpc.StatusCode.INVALID_ARGUMENT, "exceeds the limit"),
])
def test_protocol_abuse(tmp_path, csvs, solo, later, case, code, reason):
    """Replayed and foreign sessions, a second Hello mid-run, polls while a reply is owed, replies to
    commands not given or for the wrong step, absurd declared sizes: each is refused with its code,
    touches only the attacker's own membership, and the honest client trains as if alone."""
    cfg = attack_config()
    server, attacker, honest, errors, forward = raw_attack(cfg, tmp_path, csvs, later)
    got, still_in = _abuse(case, attacker, server, forward)
    assert got == code
    if still_in:
        attacker.stub.Leave(pb.Done(session=attacker.session), metadata=attacker.md, timeout=30)
    finish(server, honest, errors)
    reasons = drops(tmp_path / "server")
    assert reasons and any(reason in r for r in reasons), reasons
    assert set(drops(tmp_path / "server", HONEST)) <= {"left"}
    assert same_as_solo(server, solo, case) == 0
