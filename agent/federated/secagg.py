"""Secure aggregation (SecAgg / SecAgg+, Bonawitz et al. 2017): the host learns only the sum of the updates.

Each stage is a pure step over `bytes` so that any transport (MQTT here) can carry it:

    device SecAggClient                      host SecAggServer
    1 advertise()                  ──────▶   receive_advertise(node, msg); keys_for(node)
    2 share_keys(keys)             ──────▶   receive_shares(node, msg);    shares_for(node)
    3 masked_input(shares, x, w)   ──────▶   receive_masked(node, msg);    unmask_request()
    4 unmask(request)              ──────▶   receive_unmask(node, msg);    result()

Every device has two fresh X25519 key pairs per round: `c` encrypts the Shamir shares it sends to its
neighbours (nacl Box), `s` agrees a pairwise seed with each neighbour. The masked input is
enc(w·x, w) + PRG(b_i) + Σ_j ±PRG(s_ij) mod 2^32 (fixed point, stochastic rounding). Pairwise masks cancel in
the sum; a device that drops after masking leaves its masks behind, and the host removes them by rebuilding the
device's `s` private key from t Shamir shares held by its neighbours. Survivors' self masks b_i are rebuilt the
same way. A device answers the unmask request once and never reveals both shares of one neighbour.

Threat model: an honest-but-curious host and devices (the paper's semi-honest setting); the MQTT session's
per-device credentials and ACLs stand in for the paper's authenticated channels. The paper's consistency round
and signed key advertisements (malicious host) are not implemented. SecAgg+ (Bell et al. 2020) is the
`neighbours=k` option: a k-regular graph drawn from the round id instead of all pairs.
"""

from __future__ import annotations

import hashlib
import secrets
import struct
from dataclasses import asdict, dataclass
from typing import Any, Dict, List, Optional, Sequence, Set, Tuple

import numpy as np
from nacl.bindings import (
    crypto_aead_chacha20poly1305_ietf_encrypt,
    crypto_scalarmult,
    crypto_scalarmult_base,
)
from nacl.exceptions import CryptoError
from nacl.public import Box, PrivateKey, PublicKey

from edgefleet.agent.core.errors import AgentError

# Shamir's field: 2^255 − 19 holds a 32-byte X25519 scalar with its top bit cleared (X25519 clears it anyway).
PRIME = 2**255 - 19
RING_BITS = 32
_MAGIC = b"SA"
_KEYS, _SHARES, _FORWARD, _MASKED, _REQUEST, _UNMASK = 1, 2, 3, 4, 5, 6
_KIND_B, _KIND_S = 0, 1


class SecAggError(AgentError):
    """A secure-aggregation message or stage is invalid; the round must go on without this device."""

    default_code = "secagg-invalid"


# ---------------------------------------------------------------------------------------------- Shamir


def shamir_split(secret: int, xs: Sequence[int], threshold: int) -> List[Tuple[int, int]]:
    """Split `secret` into shares (x, f(x)) of a random degree t−1 polynomial over GF(PRIME), f(0) = secret."""
    if not 0 <= secret < PRIME:
        raise ValueError("the secret must lie in [0, PRIME)")
    if not 1 <= threshold <= len(xs):
        raise ValueError(f"threshold {threshold} must be between 1 and the number of shares {len(xs)}")
    if len(set(xs)) != len(xs) or any(not 0 < x < PRIME for x in xs):
        raise ValueError("share x-coordinates must be distinct and non-zero")
    coeffs = [secret] + [secrets.randbelow(PRIME) for _ in range(threshold - 1)]
    shares = []
    for x in xs:
        acc = 0
        for c in reversed(coeffs):  # Horner's rule
            acc = (acc * x + c) % PRIME
        shares.append((x, acc))
    return shares


def shamir_combine(shares: Sequence[Tuple[int, int]], threshold: int) -> int:
    """Rebuild the secret from ≥ `threshold` shares by Lagrange interpolation at 0; refuse with fewer."""
    points = dict(shares)
    if len(points) < threshold:
        raise SecAggError(
            "secagg-too-few-shares", f"{len(points)} distinct shares, the threshold is {threshold}"
        )
    chosen = list(points.items())[:threshold]
    secret = 0
    for i, (xi, yi) in enumerate(chosen):
        num, den = 1, 1
        for j, (xj, _) in enumerate(chosen):
            if i != j:
                num = num * (-xj) % PRIME
                den = den * (xi - xj) % PRIME
        secret = (secret + yi * num * pow(den, PRIME - 2, PRIME)) % PRIME
    return secret


# ---------------------------------------------------------------------------------------------- setup


@dataclass(frozen=True)
class SecAggSetup:
    """What every participant of one round must agree on (it travels inside the signed round plan)."""

    round_id: str
    nodes: Tuple[str, ...]
    threshold: int
    clip_range: float
    vector_size: int
    max_weight: float = 1.0
    neighbours: Optional[int] = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "nodes", tuple(self.nodes))
        n = len(self.nodes)
        if n < 2 or len(set(self.nodes)) != n:
            raise ValueError("secure aggregation needs at least two distinct nodes")
        if n >= 2**16:
            raise ValueError("secure aggregation supports at most 65535 nodes per round")
        if self.neighbours is not None and (self.neighbours < 2 or self.neighbours % 2):
            raise ValueError(
                f"neighbours must be an even number >= 2 (a k-regular ring), got {self.neighbours}"
            )
        if not 2 <= self.threshold <= self.degree + 1:
            raise ValueError(
                f"threshold {self.threshold} must be in [2, {self.degree + 1}] (neighbours + the node itself)"
            )
        if not self.clip_range > 0 or not self.max_weight > 0 or self.vector_size < 1:
            raise ValueError("clip_range and max_weight must be > 0 and vector_size >= 1")

    @property
    def degree(self) -> int:
        """Neighbours of each node: k for SecAgg+, all others for SecAgg."""
        n = len(self.nodes)
        return n - 1 if self.neighbours is None or self.neighbours >= n - 1 else self.neighbours

    @property
    def levels(self) -> int:
        """Fixed-point levels per value, so that the sum over all nodes cannot wrap around the 2^32 ring."""
        return (2**RING_BITS - 1) // len(self.nodes)

    @property
    def tag(self) -> bytes:
        """8 bytes naming the round in every message, so a message of another round is refused."""
        return hashlib.sha256(self.round_id.encode()).digest()[:8]

    def index(self, node: str) -> int:
        """Shamir x-coordinate of `node` (1-based position in `nodes`)."""
        try:
            return self.nodes.index(node) + 1
        except ValueError:
            raise SecAggError("secagg-unknown-node", f"{node!r} is not a participant of this round") from None

    def neighbours_of(self, node: str) -> List[str]:
        """Nodes that `node` masks with and shares its secrets with (a ring over a round-seeded permutation)."""
        n = len(self.nodes)
        if self.degree == n - 1:
            return [m for m in self.nodes if m != node]
        seed = int.from_bytes(
            hashlib.sha256(b"edgefleet-secagg-graph" + self.round_id.encode()).digest()[:8], "little"
        )
        order = [self.nodes[i] for i in np.random.default_rng(seed).permutation(n)]
        pos = order.index(node)
        half = self.degree // 2
        return [order[(pos + d) % n] for d in range(-half, half + 1) if d != 0]

    def to_dict(self) -> Dict[str, Any]:
        """JSON form for the round plan."""
        out = asdict(self)
        out["nodes"] = list(self.nodes)
        return out

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> SecAggSetup:
        """Parse the JSON form, refusing unknown or missing fields."""
        try:
            return cls(**data)
        except TypeError as exc:
            raise SecAggError("secagg-bad-setup", f"bad secure-aggregation setup: {exc}") from None


# ---------------------------------------------------------------------------------------------- helpers


def prg(key: bytes, size: int) -> np.ndarray:
    """`size` uniform uint32 values from ChaCha20 keyed by `key` (libsodium; the AEAD's 16-byte tag is cut)."""
    stream = crypto_aead_chacha20poly1305_ietf_encrypt(bytes(4 * size), None, bytes(12), key)
    return np.frombuffer(stream[: 4 * size], dtype="<u4").astype(np.uint32)


def _pair_key(secret: bytes, setup: SecAggSetup, a: int, b: int) -> bytes:
    """PRG key of the pair (a, b) from their X25519 secret, bound to the round and the pair."""
    lo, hi = min(a, b), max(a, b)
    return hashlib.sha256(b"edgefleet-secagg-pair" + setup.tag + struct.pack("<HH", lo, hi) + secret).digest()


def _self_key(b: int, setup: SecAggSetup) -> bytes:
    """PRG key of a node's self mask b_i."""
    return hashlib.sha256(b"edgefleet-secagg-self" + setup.tag + b.to_bytes(32, "little")).digest()


def _new_scalar() -> int:
    """A random X25519 private scalar below PRIME, so Shamir over GF(PRIME) can share it exactly."""
    while True:
        raw = bytearray(secrets.token_bytes(32))
        raw[31] &= 0x7F
        value = int.from_bytes(bytes(raw), "little")
        if value < PRIME:
            return value


def _ranges(setup: SecAggSetup) -> np.ndarray:
    """Clipping range per encoded value: the update's values, then the weight (in [0, 1])."""
    return np.concatenate([np.full(setup.vector_size, setup.clip_range), [1.0]])


def encode(values: np.ndarray, ranges: np.ndarray, levels: int, rng: np.random.Generator) -> np.ndarray:
    """Fixed point: clip to ±range, map to [0, levels−1], round stochastically (unbiased) to uint32."""
    scaled = (np.clip(values, -ranges, ranges) + ranges) / (2 * ranges) * (levels - 1)
    low = np.floor(scaled)
    up = rng.random(scaled.shape) < (scaled - low)
    return np.asarray(low + up, dtype=np.uint64).astype(np.uint32)


def decode(total: np.ndarray, ranges: np.ndarray, levels: int, count: int) -> np.ndarray:
    """Inverse of `encode` for a sum of `count` encoded vectors."""
    return np.asarray(total.astype(np.float64) * (2 * ranges) / (levels - 1) - count * ranges)


def _frame(kind: int, setup: SecAggSetup, body: bytes) -> bytes:
    """Header: magic, message kind, round tag."""
    return _MAGIC + bytes([kind]) + setup.tag + body


def _unframe(kind: int, setup: SecAggSetup, msg: bytes) -> bytes:
    """Check the header of `msg` and return its body."""
    if not isinstance(msg, (bytes, bytearray)) or len(msg) < 11 or msg[:2] != _MAGIC or msg[2] != kind:
        raise SecAggError("secagg-bad-message", f"not a secure-aggregation message of kind {kind}")
    if bytes(msg[3:11]) != setup.tag:
        raise SecAggError("secagg-wrong-round", "the message belongs to another round")
    return bytes(msg[11:])


def _records(body: bytes, size: int) -> List[bytes]:
    """Split a body of fixed-size records."""
    if len(body) % size:
        raise SecAggError("secagg-bad-message", "truncated message")
    return [body[i : i + size] for i in range(0, len(body), size)]


def _sign(a: int, b: int) -> int:
    """+1 when node a adds the pair's mask, −1 when it subtracts it (the lower index adds)."""
    return 1 if a < b else -1


# ---------------------------------------------------------------------------------------------- device


class SecAggClient:
    """One device's side of one round; call the four stages in order, each at most once."""

    def __init__(self, setup: SecAggSetup, node: str, rng: Optional[np.random.Generator] = None) -> None:
        self.setup = setup
        self.node = node
        self.idx = setup.index(node)
        self._neighbours = {setup.index(m) for m in setup.neighbours_of(node)}
        self._c_sk = PrivateKey.generate()
        self._s_sk = _new_scalar()
        self._b = secrets.randbelow(PRIME)
        self._rng = rng if rng is not None else np.random.default_rng(secrets.randbits(64))
        self._keys: Dict[int, Tuple[bytes, bytes]] = {}
        self._held: Dict[int, Tuple[int, int]] = {}  # neighbour idx -> (share of b, share of s_sk)
        self._stage = 0

    def _enter(self, stage: int) -> None:
        """Refuse a stage out of order or repeated (a second unmask answer could reveal both shares)."""
        if self._stage != stage - 1:
            raise SecAggError("secagg-stage", f"stage {stage} called after stage {self._stage}")
        self._stage = stage

    def advertise(self) -> bytes:
        """Stage 1: this round's two public keys (c for share encryption, s for mask agreement)."""
        self._enter(1)
        s_pk = crypto_scalarmult_base(self._s_sk.to_bytes(32, "little"))
        return _frame(_KEYS, self.setup, struct.pack("<H", self.idx) + bytes(self._c_sk.public_key) + s_pk)

    def share_keys(self, keys_msg: bytes) -> bytes:
        """Stage 2: Shamir-share b_i and s_sk among the neighbours, each share encrypted to its holder."""
        self._enter(2)
        for rec in _records(_unframe(_KEYS, self.setup, keys_msg), 66):
            (j,) = struct.unpack("<H", rec[:2])
            if j in self._neighbours or j == self.idx:
                self._keys[j] = (rec[2:34], rec[34:66])
        own = bytes(self._c_sk.public_key)
        if self._keys.get(self.idx, (own,))[0] != own:
            raise SecAggError("secagg-bad-keys", "the host's key list carries a wrong key for this device")
        self._keys.pop(self.idx, None)
        pks = [k for pair in self._keys.values() for k in pair]
        if len(set(pks)) != len(pks):
            raise SecAggError("secagg-bad-keys", "two neighbours advertised the same public key")
        if len(self._keys) + 1 < self.setup.threshold:
            raise SecAggError(
                "secagg-too-few", f"{len(self._keys)} neighbours left, threshold {self.setup.threshold}"
            )
        xs = [*sorted(self._keys), self.idx]
        b_shares = dict(shamir_split(self._b, xs, self.setup.threshold))
        s_shares = dict(shamir_split(self._s_sk, xs, self.setup.threshold))
        self._held[self.idx] = (b_shares[self.idx], s_shares[self.idx])
        out = []
        for j in sorted(self._keys):
            plain = (
                struct.pack("<HH", self.idx, j)
                + b_shares[j].to_bytes(32, "little")
                + s_shares[j].to_bytes(32, "little")
            )
            ct = bytes(Box(self._c_sk, PublicKey(self._keys[j][0])).encrypt(plain))
            out.append(struct.pack("<HH", j, len(ct)) + ct)
        return _frame(_SHARES, self.setup, b"".join(out))

    def masked_input(self, shares_msg: bytes, update: np.ndarray, weight: float = 1.0) -> bytes:
        """Stage 3: keep the neighbours' shares, send enc(w·x, w) + self mask + pairwise masks mod 2^32.

        `weight` (e.g. the sample count) is divided by max_weight and must not exceed it; the host gets the
        weighted mean Σ w_i x_i / Σ w_i.
        """
        self._enter(3)
        update = np.asarray(update, dtype=np.float64)
        if update.shape != (self.setup.vector_size,) or not bool(np.all(np.isfinite(update))):
            raise SecAggError(
                "secagg-bad-update", f"update must be a finite ({self.setup.vector_size},) vector"
            )
        if not 0 < weight <= self.setup.max_weight:
            raise SecAggError("secagg-bad-weight", f"weight {weight} must be in (0, {self.setup.max_weight}]")
        for src, ct in _parse_forward(_unframe(_FORWARD, self.setup, shares_msg)):
            if src not in self._keys:
                raise SecAggError("secagg-bad-shares", f"share from node {src}, which is not a neighbour")
            try:
                plain = Box(self._c_sk, PublicKey(self._keys[src][0])).decrypt(ct)
            except CryptoError:
                raise SecAggError(
                    "secagg-bad-shares", f"the share from node {src} does not decrypt"
                ) from None
            if len(plain) != 68 or struct.unpack("<HH", plain[:4]) != (src, self.idx):
                raise SecAggError(
                    "secagg-bad-shares", f"the share from node {src} is not addressed to this device"
                )
            self._held[src] = (int.from_bytes(plain[4:36], "little"), int.from_bytes(plain[36:68], "little"))
        survivors = set(self._held) - {
            self.idx
        }  # U2 among the neighbours: they sent shares, they mask with us
        if len(survivors) + 1 < self.setup.threshold:
            raise SecAggError(
                "secagg-too-few", f"{len(survivors)} neighbours shared keys, threshold {self.setup.threshold}"
            )
        r = weight / self.setup.max_weight
        size = self.setup.vector_size + 1
        masked = encode(np.append(r * update, r), _ranges(self.setup), self.setup.levels, self._rng)
        masked = masked + prg(_self_key(self._b, self.setup), size)
        sk = self._s_sk.to_bytes(32, "little")
        for j in sorted(survivors):
            pair = prg(_pair_key(crypto_scalarmult(sk, self._keys[j][1]), self.setup, self.idx, j), size)
            masked = masked + pair if _sign(self.idx, j) > 0 else masked - pair
        return _frame(_MASKED, self.setup, struct.pack("<H", self.idx) + masked.astype("<u4").tobytes())

    def unmask(self, request: bytes) -> bytes:
        """Stage 4: reveal b-shares of survivors and s-shares of dropped nodes, never both for one node."""
        self._enter(4)
        survivors, dropped = _parse_request(_unframe(_REQUEST, self.setup, request))
        if survivors & dropped:
            raise SecAggError("secagg-unsafe-request", "the host asked for both shares of the same node")
        if self.idx not in survivors:
            raise SecAggError("secagg-unsafe-request", "this device is not listed among the survivors")
        if len(survivors) < self.setup.threshold:
            raise SecAggError(
                "secagg-too-few", f"{len(survivors)} survivors, threshold {self.setup.threshold}"
            )
        out = []
        for j in sorted(self._held):
            b_share, s_share = self._held[j]
            if j in survivors:
                out.append(struct.pack("<HB", j, _KIND_B) + b_share.to_bytes(32, "little"))
            elif j in dropped:
                out.append(struct.pack("<HB", j, _KIND_S) + s_share.to_bytes(32, "little"))
        return _frame(_UNMASK, self.setup, b"".join(out))


def _parse_forward(body: bytes) -> List[Tuple[int, bytes]]:
    """Records (index, length, ciphertext) of a share message."""
    out = []
    pos = 0
    while pos < len(body):
        if pos + 4 > len(body):
            raise SecAggError("secagg-bad-message", "truncated share record")
        j, length = struct.unpack("<HH", body[pos : pos + 4])
        if pos + 4 + length > len(body):
            raise SecAggError("secagg-bad-message", "truncated share record")
        out.append((j, body[pos + 4 : pos + 4 + length]))
        pos += 4 + length
    return out


def _parse_request(body: bytes) -> Tuple[Set[int], Set[int]]:
    """(survivors, dropped) of an unmask request."""
    if len(body) < 4:
        raise SecAggError("secagg-bad-message", "truncated unmask request")
    n_s, n_d = struct.unpack("<HH", body[:4])
    if len(body) != 4 + 2 * (n_s + n_d):
        raise SecAggError("secagg-bad-message", "unmask request length does not match its counts")
    ids = struct.unpack(f"<{n_s + n_d}H", body[4:])
    return set(ids[:n_s]), set(ids[n_s:])


# ---------------------------------------------------------------------------------------------- host


class SecAggServer:
    """The host's side of one round: routes the messages and removes the masks from the sum."""

    def __init__(self, setup: SecAggSetup) -> None:
        self.setup = setup
        self._keys: Dict[int, Tuple[bytes, bytes]] = {}
        self._forward: Dict[int, Dict[int, bytes]] = {}  # holder -> {source: ciphertext}
        self._sharers: Set[int] = set()
        self._masked: Dict[int, np.ndarray] = {}
        self._revealed: Dict[int, Dict[int, Tuple[int, int]]] = {}  # responder -> {node: (kind, share)}
        self._request: Optional[Tuple[Set[int], Set[int]]] = None

    def _idx(self, node: str, msg_idx: int) -> int:
        """Index of `node`, refusing a message that claims to come from another node."""
        i = self.setup.index(node)
        if msg_idx != i:
            raise SecAggError("secagg-impersonation", f"{node!r} sent a message signed as node {msg_idx}")
        return i

    def receive_advertise(self, node: str, msg: bytes) -> None:
        """Stage 1: record a device's public keys."""
        body = _unframe(_KEYS, self.setup, msg)
        if len(body) != 66:
            raise SecAggError("secagg-bad-message", "key advertisement must carry two 32-byte keys")
        i = self._idx(node, struct.unpack("<H", body[:2])[0])
        self._keys[i] = (body[2:34], body[34:66])

    def keys_for(self, node: str) -> bytes:
        """Stage 1 answer: the public keys of `node`'s neighbours (and its own, so it can check them)."""
        i = self.setup.index(node)
        wanted = {self.setup.index(m) for m in self.setup.neighbours_of(node)} | {i}
        body = b"".join(
            struct.pack("<H", j) + c + s for j, (c, s) in sorted(self._keys.items()) if j in wanted
        )
        return _frame(_KEYS, self.setup, body)

    def receive_shares(self, node: str, msg: bytes) -> None:
        """Stage 2: keep the encrypted shares a device sent, to forward them to their holders."""
        i = self.setup.index(node)
        for j, ct in _parse_forward(_unframe(_SHARES, self.setup, msg)):
            self._forward.setdefault(j, {})[i] = ct
        self._sharers.add(i)

    def shares_for(self, node: str) -> bytes:
        """Stage 2 answer: the shares addressed to `node` (from the neighbours that completed stage 2)."""
        held = self._forward.get(self.setup.index(node), {})
        body = b"".join(
            struct.pack("<HH", src, len(ct)) + ct for src, ct in sorted(held.items()) if src in self._sharers
        )
        return _frame(_FORWARD, self.setup, body)

    def receive_masked(self, node: str, msg: bytes) -> None:
        """Stage 3: keep a device's masked input."""
        body = _unframe(_MASKED, self.setup, msg)
        size = self.setup.vector_size + 1
        if len(body) != 2 + 4 * size:
            raise SecAggError("secagg-bad-message", f"masked input must hold {size} uint32 values")
        i = self._idx(node, struct.unpack("<H", body[:2])[0])
        if i not in self._sharers:
            raise SecAggError("secagg-stage", f"{node!r} sent a masked input without sharing its keys")
        self._masked[i] = np.frombuffer(body[2:], dtype="<u4").astype(np.uint32)

    def unmask_request(self) -> bytes:
        """Stage 3 answer: who survived (send b-shares) and who dropped after sharing keys (send s-shares)."""
        survivors = set(self._masked)
        dropped = self._sharers - survivors
        if len(survivors) < self.setup.threshold:
            raise SecAggError(
                "secagg-too-few", f"{len(survivors)} masked inputs, threshold {self.setup.threshold}"
            )
        self._request = (survivors, dropped)
        ids = sorted(survivors) + sorted(dropped)
        return _frame(
            _REQUEST, self.setup, struct.pack(f"<HH{len(ids)}H", len(survivors), len(dropped), *ids)
        )

    def receive_unmask(self, node: str, msg: bytes) -> None:
        """Stage 4: keep the shares a surviving device revealed."""
        i = self.setup.index(node)
        if self._request is None or i not in self._request[0]:
            raise SecAggError("secagg-stage", f"{node!r} answered an unmask request it was not part of")
        got: Dict[int, Tuple[int, int]] = {}
        for rec in _records(_unframe(_UNMASK, self.setup, msg), 35):
            j, kind = struct.unpack("<HB", rec[:3])
            got[j] = (kind, int.from_bytes(rec[3:], "little"))
        self._revealed[i] = got

    @property
    def survivors(self) -> List[str]:
        """Nodes whose masked input is in the sum."""
        return [self.setup.nodes[i - 1] for i in sorted(self._masked)]

    @property
    def dropped(self) -> List[str]:
        """Nodes that advertised keys but whose input is not in the sum."""
        return [self.setup.nodes[i - 1] for i in sorted(set(self._keys) - set(self._masked))]

    def _rebuild(self, node: int, kind: int) -> int:
        """Rebuild node's b (kind 0) or s private key (kind 1) from the revealed shares."""
        shares = []
        for responder, got in self._revealed.items():
            entry = got.get(node)
            if entry is not None and entry[0] == kind:
                shares.append((responder, entry[1]))
        return shamir_combine(shares, self.setup.threshold)

    def result(self) -> Tuple[np.ndarray, float]:
        """The weighted mean Σ w_i x_i / Σ w_i over survivors, and Σ w_i; raises if it cannot be unmasked."""
        if self._request is None:
            raise SecAggError("secagg-stage", "call unmask_request() and collect the answers first")
        survivors, dropped = self._request
        size = self.setup.vector_size + 1
        total = np.zeros(size, dtype=np.uint32)
        for i in survivors:
            total = total + self._masked[i]
        for i in survivors:
            total = total - prg(_self_key(self._rebuild(i, _KIND_B), self.setup), size)
        for j in dropped:
            sk = self._rebuild(j, _KIND_S).to_bytes(32, "little")
            if crypto_scalarmult_base(sk) != self._keys[j][1]:
                raise SecAggError(
                    "secagg-bad-shares", f"node {j}'s rebuilt key does not match its advertised key"
                )
            for k in survivors:
                if k in {self.setup.index(m) for m in self.setup.neighbours_of(self.setup.nodes[j - 1])}:
                    pair = prg(_pair_key(crypto_scalarmult(sk, self._keys[k][1]), self.setup, k, j), size)
                    # Survivor k added sign(k, j)·pair; take it out.
                    total = total - pair if _sign(k, j) > 0 else total + pair
        values = decode(total, _ranges(self.setup), self.setup.levels, len(survivors))
        weight = float(values[-1])
        if not weight > 0:
            raise SecAggError("secagg-empty", "the unmasked total weight is not positive")
        return np.asarray(values[:-1] / weight), weight * self.setup.max_weight
