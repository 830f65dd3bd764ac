"""Shared helpers of the deployment tests (tests/test_deploy*.py) and the gRPC attack tests
(tests/attack_wire.py): the token file, the config, the clients' CSV files, a server in a thread, an
honest client in a thread, and raw protocol calls."""

import csv
import json
import subprocess
import threading
from pathlib import Path

import grpc
import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_config
from splitlora.transport import splitlora_pb2 as pb
from splitlora.transport.wire import from_chunks, to_chunks


TOKENS = {"0": "token-zero-" + "x" * 20, "1": "token-one-" + "y" * 20}


STEPS = 14


def deploy_config(**overrides):
    base = dict(clients=3, steps=STEPS, aggregate_every=2, synthetic_examples=60, threads=1)
    base.update(overrides)
    return tiny_config(**base)


def write_client_csvs(cfg, tokenizer, root: Path) -> list[Path]:
    """Client i's share of the simulation's training data, in order, as its own CSV file."""
    from splitlora.data import prepare_data

    data = prepare_data(cfg, tokenizer)
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, indices in enumerate(data.client_indices):
        path = root / f"client_{i}.csv"
        with path.open("w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh)
            writer.writerow(["mr", "ref"])
            for j in indices:
                writer.writerow([data.train_examples[j].mr, data.train_examples[j].ref])
        paths.append(path)
    return paths


def adapter(path) -> dict[str, torch.Tensor]:
    return load_file(str(Path(path) / "adapter_model.safetensors"))


def max_abs_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def self_signed_cert(root: Path) -> tuple[Path, Path, Path]:
    """A self-signed certificate for 127.0.0.1/localhost: (cert, key, CA = the cert itself)."""
    cert, key = root / "server.crt", root / "server.key"
    try:
        import datetime
        import ipaddress

        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID
    except ImportError:
        proc = subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
                               "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=localhost",
                               "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
                              capture_output=True, timeout=60)
        if proc.returncode != 0:
            pytest.skip("neither the cryptography package nor openssl can make a test certificate")
        return cert, key, cert
    pkey = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    crt = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(pkey.public_key())
           .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
           .not_valid_after(now + datetime.timedelta(days=1))
           .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                       x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                          critical=False)
           .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
           .sign(pkey, hashes.SHA256()))
    cert.write_bytes(crt.public_bytes(serialization.Encoding.PEM))
    key.write_bytes(pkey.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    return cert, key, cert


def step_rows(records):
    return [r for r in records if "event" not in r]


def events(records, name):
    return [r for r in records if r.get("event") == name]


def read_records(server_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (server_dir / "metrics.jsonl").read_text().splitlines()]


class ThreadServer:
    """`serve` in a thread of this process, for poking at it with hand-made messages."""

    def __init__(self, cfg, out: Path, tokens: dict[str, str], **options):
        from splitlora.config import ServeOptions
        from splitlora.transport.serve import serve

        self.box, self.error, self.result = [], None, None
        ready = threading.Event()
        self.port = 0
        options = {"join_timeout": 120, "linger": 1.0, **options}
        opts = ServeOptions(tokens=tokens, listen="127.0.0.1:0", progress=False, handle_signals=False, **options)

        def run():
            try:
                self.result = serve(cfg, opts, out, on_ready=lambda p: (setattr(self, "port", p), ready.set()),
                                    grid_box=self.box)
            except BaseException as exc:  # noqa: BLE001 - the test reads it
                self.error = exc
                ready.set()

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        assert ready.wait(120), "server did not start"
        assert self.error is None, self.error
        self.grid = self.box[0]

    def stop(self):
        if self.thread.is_alive():
            self.grid.request_stop("test over")
            self.thread.join(30)


def rpc(stub, method, msg, metadata, reply_cls, timeout=60):
    responses = getattr(stub, method)(to_chunks(msg), metadata=metadata, timeout=timeout)
    reply, _ = from_chunks(responses, reply_cls, 1 << 30)
    for _ in responses:  # to the end of the call
        pass
    return reply


def code_of(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as err:
        call()
    return err.value.code()


def md(name: str, token: str | None = None):
    return (("authorization", f"Bearer {token or TOKENS[name]}"), ("splitlora-client-id", name))


def honest_client(port, name, csv, errors, tokens=TOKENS, results: list | None = None, **options):
    """An ordinary client (:class:`RemoteClient`, what ``splitlora client`` runs) in a thread; its
    exception goes to ``errors``, its result to ``results``."""
    from splitlora.config import ClientOptions
    from splitlora.transport.remote_client import RemoteClient

    options = {"reconnect_timeout": 30.0, **options}

    def run():
        try:
            result = RemoteClient(ClientOptions(server=f"127.0.0.1:{port}", client_id=name, token=tokens[name],
                                                data=str(csv), progress=False, **options)).run()
            if results is not None:
                results.append(result)
        except BaseException as exc:  # noqa: BLE001 - the test reads it
            errors.append(exc)

    thread = threading.Thread(target=run, daemon=True, name=f"client-{name}")
    thread.start()
    return thread


def poll_until_asked(stub, session, metadata, want="forward", limit=40):
    """Exchange polls until the server's commands end with ``want``; returns that command."""
    for _ in range(limit):
        out = rpc(stub, "Exchange", pb.ClientMessage(session=session), metadata, pb.ServerMessage, timeout=120)
        last = out.commands[-1]
        if last.WhichOneof("kind") == want:
            return last
    raise AssertionError(f"the server never sent {want}")
