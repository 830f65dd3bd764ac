"""Secure aggregation of client adapters (SecAgg: Bonawitz et al., CCS 2017; the structure of
Flower's SecAgg+ workflow): the aggregator learns the weighted sum of the clients' updates, and
nothing else about any one of them, even when some clients drop out mid-round.

One round, four stages (the server only relays; every message below is what it sees):

1. **keys** - each client makes two X25519 key pairs: ``c`` (to encrypt shares to other clients)
   and ``s`` (to agree pairwise masks); it sends the two public keys.
2. **shares** - each client draws a self-mask seed ``b``, Shamir-shares ``b`` and its ``s`` private
   key among all clients with threshold ``t`` (pycryptodome's Shamir, as Flower uses it), and
   encrypts each share to its recipient (AES-GCM, key = HKDF of the X25519 agreement of ``c`` keys).
3. **masked input** - each client encodes its update in fixed point in Z_(2^64) (each coordinate
   clipped to ``[-clip, clip]`` first: the encoding's range, stated in docs/privacy.md), adds
   ``PRG(b)`` and, for every other client ``j`` that shared, ``+/- PRG(agree(s_i, s_j))`` (``+``
   when ``i < j``): the pairwise masks cancel in the sum, the self mask does not.
4. **unmask** - the server names who sent a masked input (survivors) and who did not (dropped);
   each survivor returns its share of ``b_j`` for every survivor and of ``s_j`` for every dropped
   client, never both for one client. With ``t`` answers the server removes the survivors' self
   masks and the dropped clients' pairwise masks, and decodes the sum.

Trust model: honest-but-curious server, fewer than ``t`` clients colluding with it; a client that
drops after stage 3 is still in the sum. The masks come from AES-256-CTR keyed by HKDF outputs.
"""

from __future__ import annotations

import math
import os
import struct
from dataclasses import dataclass, field

import numpy as np
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

LEVELS_BITS = 40  # fixed-point levels of one client's coordinate; the sum of 2^24 clients fits in 2^64
RAW = serialization.Encoding.Raw


class SecAggError(RuntimeError):
    """A stage that cannot go on (too few clients, a share that does not decrypt, ...)."""


@dataclass(frozen=True)
class Params:
    """What every party of a round agrees on (the server sends it; nothing secret)."""

    round: int
    clients: tuple[int, ...]  # the indices invited to the round
    threshold: int  # shares needed to reconstruct a secret (tolerates n - t drops)
    clip: float  # each coordinate of an update is clipped to [-clip, clip]
    max_weight: int  # the largest FedAvg weight a client may put on its update
    length: int  # coordinates of one update (before the weight coordinate)

    def check(self) -> None:
        n = len(self.clients)
        if not 2 <= self.threshold <= n:
            raise SecAggError(f"threshold {self.threshold} must be in [2, {n}]")
        if n >= 2 ** (64 - LEVELS_BITS) or self.max_weight * n >= 2 ** 63:
            raise SecAggError("too many clients or too large a weight for the 64-bit encoding")


def default_threshold(n: int) -> int:
    """A majority: the sum survives up to ``n - t`` drops, and fewer than ``t`` colluders learn nothing."""
    return max(2, n // 2 + 1)


# ---- primitives ------------------------------------------------------------------------------------

def _kdf(secret: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(secret)


def prg(seed: bytes, length: int) -> np.ndarray:
    """``length`` uniform elements of Z_(2^64) from a 32-byte seed (AES-256-CTR keystream)."""
    stream = Cipher(algorithms.AES(seed), modes.CTR(b"\0" * 16)).encryptor().update(b"\0" * (8 * length))
    return np.frombuffer(stream, dtype="<u8").astype(np.uint64)


def encode(update: np.ndarray, weight: int, p: Params) -> np.ndarray:
    """``weight * clip(update)`` in fixed point, then the weight itself (exact): one Z_(2^64) vector."""
    bound = p.clip * p.max_weight
    x = np.clip(np.asarray(update, dtype=np.float64), -p.clip, p.clip) * float(weight)
    levels = float(2 ** LEVELS_BITS)
    q = np.rint((x + bound) * (levels / (2 * bound))).astype(np.uint64)
    return np.concatenate([q, np.array([weight], dtype=np.uint64)])


def decode(total: np.ndarray, count: int, p: Params) -> tuple[np.ndarray, int]:
    """``(sum of weight * update, sum of weights)`` from the sum of ``count`` encodings."""
    bound = p.clip * p.max_weight
    levels = float(2 ** LEVELS_BITS)
    values = total[:-1].astype(np.float64) * (2 * bound / levels) - count * bound
    return values, int(total[-1])


def precision(p: Params, count: int) -> float:
    """The largest error of a decoded coordinate of the weighted sum (rounding, half a level each)."""
    return count * p.clip * p.max_weight / 2 ** LEVELS_BITS


def _shamir():
    try:
        from Crypto.Protocol.SecretSharing import Shamir
    except ImportError:
        from ..errors import UserError

        raise UserError("secure aggregation needs pycryptodome: pip install 'splitlora[secagg]'") from None
    return Shamir


def _split(secret: bytes, k: int, n: int) -> list[bytes]:
    """Shamir shares of a 32-byte secret for holders 1..n (two 16-byte halves, pycryptodome)."""
    Shamir = _shamir()

    halves = [Shamir.split(k, n, secret[i:i + 16]) for i in (0, 16)]
    return [a + b for (_, a), (_, b) in zip(*halves)]


def _combine(shares: dict[int, bytes]) -> bytes:
    """The secret from ``{holder (1-based): share}`` (at least ``k`` of them)."""
    Shamir = _shamir()

    return b"".join(Shamir.combine([(x, s[i:i + 16]) for x, s in shares.items()]) for i in (0, 16))


def _public(key: X25519PublicKey) -> bytes:
    return key.public_bytes(RAW, serialization.PublicFormat.Raw)


# ---- messages (what the server sees) ---------------------------------------------------------------

@dataclass
class Keys:
    index: int
    c_public: bytes
    s_public: bytes


@dataclass
class Unmasking:
    """A survivor's answer: its shares of the survivors' ``b`` and of the dropped clients' ``s`` keys."""

    index: int
    b_shares: dict[int, bytes] = field(default_factory=dict)
    s_shares: dict[int, bytes] = field(default_factory=dict)


# ---- the client --------------------------------------------------------------------------------------

class SecAggClient:
    """One client's side of a round (fresh keys and seeds every round)."""

    def __init__(self, index: int, params: Params):
        params.check()
        self.index, self.p = index, params
        self._c = X25519PrivateKey.generate()
        self._s = X25519PrivateKey.generate()
        self._b = os.urandom(32)
        self.keys: dict[int, Keys] = {}
        self.shared: list[int] = []  # clients whose shares reached this one (pairwise masks with them)
        self._shares: dict[int, tuple[bytes, bytes]] = {}  # from client j: (share of b_j, share of s_j)
        self._answered = False

    def advertise(self) -> Keys:
        return Keys(self.index, _public(self._c.public_key()), _public(self._s.public_key()))

    def _aead(self, j: int) -> AESGCM:
        secret = self._c.exchange(X25519PublicKey.from_public_bytes(self.keys[j].c_public))
        return AESGCM(_kdf(secret, b"splitlora secagg shares %d" % self.p.round))

    def share(self, keys: dict[int, Keys]) -> dict[int, bytes]:
        """Stage 2: ``{recipient: ciphertext}`` of this client's shares (the server relays them)."""
        if len(keys) < self.p.threshold:
            raise SecAggError(f"{len(keys)} clients sent keys; the threshold is {self.p.threshold}")
        if keys.get(self.index) != self.advertise():
            raise SecAggError("the server relayed keys that are not this client's own")
        if len({(k.c_public, k.s_public) for k in keys.values()}) != len(keys):
            raise SecAggError("two clients advertised the same keys")
        self.keys = dict(keys)
        holders = sorted(keys)
        s_raw = self._s.private_bytes(RAW, serialization.PrivateFormat.Raw, serialization.NoEncryption())
        b_shares = _split(self._b, self.p.threshold, len(holders))
        s_shares = _split(s_raw, self.p.threshold, len(holders))
        out = {}
        for pos, j in enumerate(holders):
            if j == self.index:
                self._shares[j] = (b_shares[pos], s_shares[pos])
                continue
            nonce = os.urandom(12)
            plain = self.index.to_bytes(4, "big") + j.to_bytes(4, "big") + b_shares[pos] + s_shares[pos]
            out[j] = nonce + self._aead(j).encrypt(nonce, plain, None)
        return out

    def masked_input(self, received: dict[int, bytes], update: np.ndarray, weight: int) -> np.ndarray:
        """Stage 3: decrypt the shares sent to this client (``{sender: ciphertext}``) and return the
        masked encoding of ``weight * update``."""
        if not 0 <= weight <= self.p.max_weight:
            raise SecAggError(f"weight {weight} outside [0, {self.p.max_weight}]")
        if len(update) != self.p.length:
            raise SecAggError(f"update of {len(update)} values; the round expects {self.p.length}")
        for j, blob in received.items():
            if j == self.index or j not in self.keys:
                raise SecAggError(f"a share from client {j}, which is not in this round")
            try:
                plain = self._aead(j).decrypt(blob[:12], blob[12:], None)
            except Exception as exc:  # a tampered or misrouted ciphertext
                raise SecAggError(f"the share from client {j} does not decrypt") from exc
            if plain[:4] != j.to_bytes(4, "big") or plain[4:8] != self.index.to_bytes(4, "big"):
                raise SecAggError(f"the share from client {j} names other parties")
            self._shares[j] = (plain[8:40], plain[40:72])
        self.shared = sorted(set(received) | {self.index})
        if len(self.shared) < self.p.threshold:
            raise SecAggError(f"shares from {len(self.shared)} clients; the threshold is {self.p.threshold}")
        n = self.p.length + 1
        y = encode(update, weight, self.p) + prg(self._b, n)
        for j in self.shared:
            if j != self.index:
                mask = prg(pairwise_seed(self._s, self.keys[j].s_public, self.p.round), n)
                y = y + mask if self.index < j else y - mask
        return y

    def unmask(self, survivors: list[int], dropped: list[int]) -> Unmasking:
        """Stage 4: the shares the server needs, once; never ``b`` and ``s`` of one client."""
        if self._answered:
            raise SecAggError("unmasking was already answered this round")
        if set(survivors) & set(dropped):
            raise SecAggError("a client named both survivor and dropped")
        if len(survivors) < self.p.threshold or self.index not in survivors:
            raise SecAggError(f"{len(survivors)} survivors; the threshold is {self.p.threshold}")
        if not set(survivors) | set(dropped) <= set(self.shared):
            raise SecAggError("unmasking names clients that did not share")
        self._answered = True
        return Unmasking(self.index, {j: self._shares[j][0] for j in survivors},
                         {j: self._shares[j][1] for j in dropped})


def pairwise_seed(own: X25519PrivateKey, peer_public: bytes, round_: int) -> bytes:
    secret = own.exchange(X25519PublicKey.from_public_bytes(peer_public))
    return _kdf(secret, b"splitlora secagg mask %d" % round_)


# ---- the server -------------------------------------------------------------------------------------

def unmask_sum(p: Params, keys: dict[int, Keys], shared: list[int], masked: dict[int, np.ndarray],
               answers: list[Unmasking]) -> tuple[np.ndarray, int]:
    """``(sum of weight * update, sum of weights)`` over the clients in ``masked``, from the masked
    inputs and at least ``threshold`` answers. ``shared``: the clients whose shares were relayed
    (those of them absent from ``masked`` dropped after sharing)."""
    survivors = sorted(masked)
    dropped = sorted(set(shared) - set(masked))
    if len(answers) < p.threshold:
        raise SecAggError(f"{len(answers)} unmasking answers; the threshold is {p.threshold}")
    holder = {j: pos + 1 for pos, j in enumerate(sorted(keys))}  # Shamir x-coordinate of each client
    n = p.length + 1
    total = np.zeros(n, dtype=np.uint64)
    for j in survivors:
        total = total + masked[j]
    for j in survivors:  # remove the self masks
        b = _combine({holder[a.index]: a.b_shares[j] for a in answers[:p.threshold]})
        total = total - prg(b, n)
    for j in dropped:  # remove the pairwise masks the survivors added with a client that left
        s_raw = _combine({holder[a.index]: a.s_shares[j] for a in answers[:p.threshold]})
        s = X25519PrivateKey.from_private_bytes(s_raw)
        for i in survivors:
            mask = prg(pairwise_seed(s, keys[i].s_public, p.round), n)
            total = total - mask if i < j else total + mask
    return decode(total, len(survivors), p)


def run_in_process(p: Params, updates: dict[int, np.ndarray], weights: dict[int, int],
                   drop_after_sharing: tuple[int, ...] = ()) -> tuple[np.ndarray, int, dict]:
    """One round with every client in this process: ``(weighted sum, total weight, server's view)``.
    Clients in ``drop_after_sharing`` leave after stage 2 (their masked input never arrives)."""
    clients = {i: SecAggClient(i, p) for i in p.clients}
    keys = {i: c.advertise() for i, c in clients.items()}
    outgoing = {i: c.share(keys) for i, c in clients.items()}
    shared = sorted(outgoing)
    masked = {}
    for i, c in clients.items():
        if i in drop_after_sharing:
            continue
        masked[i] = c.masked_input({j: out[i] for j, out in outgoing.items() if i in out}, updates[i], weights[i])
    survivors, dropped = sorted(masked), sorted(set(shared) - set(masked))
    answers = [clients[i].unmask(survivors, dropped) for i in survivors]
    values, weight = unmask_sum(p, keys, shared, masked, answers)
    view = {"keys": keys, "ciphertexts": outgoing, "masked": masked, "answers": answers}
    return values, weight, view


def view_bytes(view: dict) -> dict[str, int]:
    """Bytes each stage moves through the server (up from clients; the relay down is the same size)."""
    return {"keys": sum(len(k.c_public) + len(k.s_public) + 4 for k in view["keys"].values()),
            "shares": sum(len(b) + 4 for out in view["ciphertexts"].values() for b in out.values()),
            "masked": sum(int(m.nbytes) for m in view["masked"].values()),
            "unmask": sum(36 * (len(a.b_shares) + len(a.s_shares)) for a in view["answers"])}


# ---- the bytes each stage carries (struct-packed: nothing is unpickled) ------------------------------

def _u32s(values) -> bytes:
    values = list(values)
    return struct.pack(f">I{len(values)}I", len(values), *values)


def _read_u32s(data: bytes, at: int = 0) -> tuple[list[int], int]:
    (n,) = struct.unpack_from(">I", data, at)
    return list(struct.unpack_from(f">{n}I", data, at + 4)), at + 4 + 4 * n


def pack_params(p: Params) -> bytes:
    return struct.pack(">QIdQQ", p.round, p.threshold, p.clip, p.max_weight, p.length) + _u32s(p.clients)


def unpack_params(data: bytes) -> Params:
    round_, threshold, clip, max_weight, length = struct.unpack_from(">QIdQQ", data)
    clients, end = _read_u32s(data, struct.calcsize(">QIdQQ"))
    _expect_end(data, end)
    if not (math.isfinite(clip) and clip > 0):
        raise SecAggError(f"clip range {clip} must be finite and > 0")
    p = Params(round_, tuple(clients), threshold, clip, max_weight, length)
    p.check()
    return p


def pack_keys(keys: dict[int, Keys]) -> bytes:
    return struct.pack(">I", len(keys)) + b"".join(struct.pack(">I", k.index) + k.c_public + k.s_public
                                                   for k in keys.values())


def unpack_keys(data: bytes) -> dict[int, Keys]:
    (n,) = struct.unpack_from(">I", data)
    _expect_end(data, 4 + n * 68)
    out = {}
    for at in range(4, 4 + n * 68, 68):
        (i,) = struct.unpack_from(">I", data, at)
        out[i] = Keys(i, data[at + 4:at + 36], data[at + 36:at + 68])
    return out


def pack_blobs(blobs: dict[int, bytes]) -> bytes:
    return struct.pack(">I", len(blobs)) + b"".join(struct.pack(">II", i, len(b)) + b for i, b in blobs.items())


def unpack_blobs(data: bytes, max_len: int = 1024) -> dict[int, bytes]:
    (n,) = struct.unpack_from(">I", data)
    out, at = {}, 4
    for _ in range(n):
        i, size = struct.unpack_from(">II", data, at)
        if size > max_len or at + 8 + size > len(data):
            raise SecAggError("a relayed share of an impossible size")
        out[i] = data[at + 8:at + 8 + size]
        at += 8 + size
    _expect_end(data, at)
    return out


def pack_unmasking(a: Unmasking) -> bytes:
    return pack_blobs({**{2 * j: s for j, s in a.b_shares.items()}, **{2 * j + 1: s for j, s in a.s_shares.items()}})


def unpack_unmasking(index: int, data: bytes) -> Unmasking:
    out = Unmasking(index)
    for key, share in unpack_blobs(data, 32).items():
        if len(share) != 32:
            raise SecAggError("an unmasking share must be 32 bytes")
        (out.s_shares if key % 2 else out.b_shares)[key // 2] = share
    return out


def pack_vector(y: np.ndarray) -> bytes:
    return y.astype("<u8").tobytes()


def unpack_vector(data: bytes, p: Params) -> np.ndarray:
    if len(data) != 8 * (p.length + 1):
        raise SecAggError(f"a masked input of {len(data)} bytes; the round expects {8 * (p.length + 1)}")
    return np.frombuffer(data, dtype="<u8").astype(np.uint64)


def _expect_end(data: bytes, end: int) -> None:
    if end != len(data):
        raise SecAggError(f"a stage message of {len(data)} bytes; its content ends at {end}")


def pack_roster(survivors: list[int], dropped: list[int]) -> bytes:
    """Stage 4's question: who sent a masked input, and who shared but did not."""
    return _u32s(survivors) + _u32s(dropped)


def unpack_roster(data: bytes) -> tuple[list[int], list[int]]:
    survivors, at = _read_u32s(data)
    dropped, end = _read_u32s(data, at)
    _expect_end(data, end)
    return survivors, dropped
