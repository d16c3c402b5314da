"""The signed envelope every gossip message travels in (spec: ``protocols/wire.md``).

Wire format: a msgpack array ``[body, sig]`` of two bins. ``body`` is the canonical
msgpack map of the fields (``v kind run sender round seq ts payload``, in that order);
``sig`` is the Ed25519 signature by ``sender`` over::

    b"p2pfm/envelope/v1\\x00" + kind + b"\\x00" + run + b"\\x00" + body

The receiver verifies the body bytes it received, never a re-encoding, and it does so
before it looks into the payload. :func:`open_envelope` applies the checks in the order
wire.md lists them and raises the matching :class:`~p2pfm.core.errors.Reject` subclass.

Time is an argument (``timestamp`` when sealing, ``now`` when opening): nothing here reads
a clock, so the simulator's virtual clock and the daemon's wall clock drive the same code.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import msgpack

from p2pfm.config import require
from p2pfm.core.errors import (
    BadSignature,
    ClockSkew,
    Malformed,
    NonFinite,
    Oversize,
    Replay,
    SchemaViolation,
    UnknownKind,
    UnknownVersion,
    WrongRun,
)
from p2pfm.core.identity import (
    PUBLIC_KEY_BYTES,
    SIGNATURE_BYTES,
    Identity,
    peer_id_from_public_key,
)
from p2pfm.core.identity import verify_signature as _verify
from p2pfm.core.schema import INT64_MAX, KIND_SCHEMAS, validate_payload

PROTOCOL_VERSION = 1
DOMAIN = b"p2pfm/envelope/v1\x00"
MAX_KIND_LEN = 64
MAX_RUN_LEN = 128
HEADER_FIELDS = ("v", "kind", "run", "sender", "round", "seq", "ts", "payload")
"""Body fields in their canonical order."""
_HEADER_SET = frozenset(HEADER_FIELDS)

_MIB = 1024 * 1024


@dataclass(frozen=True)
class EnvelopeLimits:
    """Receiver-side limits. Defaults carry their reasons."""

    max_bytes: int = 64 * _MIB
    """Whole message, checked before decoding: a full fp32 update of a ~16M-parameter model."""
    max_clock_skew_s: float = 120.0
    """Edge devices' clocks drift and NTP may be late; two minutes tolerates that, not replays."""
    replay_window_s: float = 600.0
    """How long (sender, seq) pairs are remembered; must cover the skew on both sides."""
    max_payload_depth: int = 8
    """Nesting of maps/lists inside a payload; our schemas need 4, codec maps a little more."""
    max_opaque_items: int = 4096
    """Nodes inside an opaque (codec) map; tensors travel as one bin, so metadata stays small."""

    def __post_init__(self) -> None:
        require(self.max_bytes >= 64, "max_bytes", "must be at least 64 bytes")
        require(
            math.isfinite(self.max_clock_skew_s) and self.max_clock_skew_s >= 0,
            "max_clock_skew_s",
            "must be a finite number >= 0",
        )
        require(
            math.isfinite(self.replay_window_s) and self.replay_window_s >= self.max_clock_skew_s,
            "replay_window_s",
            "must be finite and >= max_clock_skew_s (older messages could not be checked for replay)",
        )
        require(self.max_payload_depth >= 2, "max_payload_depth", "must be >= 2")
        require(self.max_opaque_items >= 1, "max_opaque_items", "must be >= 1")


@dataclass(frozen=True)
class Envelope:
    """A verified message: every field has passed the checks of :func:`open_envelope`."""

    version: int
    kind: str
    run_id: str
    sender: bytes
    round: int
    seq: int
    timestamp: float
    payload: dict[str, Any]
    signature: bytes

    @property
    def sender_id(self) -> str:
        """The sender's peer id (see :func:`~p2pfm.core.identity.peer_id_from_public_key`)."""
        return peer_id_from_public_key(self.sender)


class ReplayGuard:
    """Remembers (sender, seq) pairs seen within ``window_s``, in bounded memory.

    Entries expire when their *message* timestamp falls more than ``window_s`` behind
    ``now``. A message that old is refused outright, since its pair may have been forgotten.
    When more than ``max_entries`` pairs are live, the oldest are dropped and every message
    not newer than the newest dropped one is refused from then on: under a flood the guard
    may refuse honest late messages, but it never accepts a replay.
    """

    def __init__(self, window_s: float = 600.0, max_entries: int = 100_000) -> None:
        if not (math.isfinite(window_s) and window_s > 0):
            raise ValueError(f"window_s must be a finite number > 0, got {window_s!r}")
        if max_entries < 1:
            raise ValueError(f"max_entries must be >= 1, got {max_entries!r}")
        self.window_s = float(window_s)
        self.max_entries = int(max_entries)
        self._seen: dict[tuple[bytes, int], float] = {}
        self._by_time: list[tuple[float, bytes, int]] = []  # min-heap for eviction
        self._floor = -math.inf  # timestamps <= floor may have been forgotten early

    @classmethod
    def for_limits(cls, limits: EnvelopeLimits, max_entries: int = 100_000) -> ReplayGuard:
        return cls(window_s=limits.replay_window_s, max_entries=max_entries)

    def __len__(self) -> int:
        return len(self._seen)

    def check_and_record(self, sender: bytes, seq: int, timestamp: float, now: float) -> None:
        """Raise Replay if (sender, seq) was seen, or freshness cannot be proven; else record it."""
        if not math.isfinite(now):
            raise ValueError(f"now must be finite, got {now!r}")
        # [REJECT] a NaN/Inf time can be neither compared nor expired.
        if not math.isfinite(timestamp):
            raise Replay(f"ts: {timestamp!r} is not a finite time, freshness cannot be checked")
        self._expire(now)
        # [REJECT] older than the window: its first copy may already be forgotten.
        if timestamp < now - self.window_s:
            raise Replay(
                f"ts: message time {timestamp!r} is older than the replay window "
                f"({self.window_s:g} s before now={now!r})"
            )
        # [REJECT] not newer than a pair dropped for lack of memory: it cannot be checked.
        if timestamp <= self._floor:
            raise Replay(f"ts: message time {timestamp!r} is within the forgotten range (<= {self._floor!r})")
        key = (bytes(sender), seq)
        # [REJECT] the pair itself was seen inside the window.
        if key in self._seen:
            raise Replay(f"seq: {seq} from {peer_id_from_public_key(key[0])} was already seen")
        self._seen[key] = timestamp
        heapq.heappush(self._by_time, (timestamp, key[0], seq))
        while len(self._seen) > self.max_entries:
            old_ts, old_sender, old_seq = heapq.heappop(self._by_time)
            del self._seen[(old_sender, old_seq)]
            self._floor = max(self._floor, old_ts)

    def _expire(self, now: float) -> None:
        horizon = now - self.window_s
        while self._by_time and self._by_time[0][0] < horizon:
            _, sender, seq = heapq.heappop(self._by_time)
            del self._seen[(sender, seq)]


# --- canonical bytes ---------------------------------------------------------------------


def _canonical(value: Any) -> Any:
    """Maps with keys in sorted order (recursively), so equal payloads pack to equal bytes."""
    if isinstance(value, dict):
        return {k: _canonical(value[k]) for k in sorted(value)}
    if type(value) in (list, tuple):  # exact types: msgpack.ExtType is a namedtuple
        return [_canonical(v) for v in value]
    return value


_PACK_OPTIONS: dict[str, Any] = {"use_bin_type": True, "use_single_float": False, "strict_types": False}
_PAYLOAD_KEY = msgpack.packb("payload", use_bin_type=True)


def pack_body(fields: Mapping[str, Any]) -> bytes:
    """Canonical msgpack of a body map: header keys in the given order, nested maps sorted.

    Floats are always float64, bytes are bin, strings are str, no ext types. :func:`seal`
    uses it with the fields in :data:`HEADER_FIELDS` order; tests and the vector generator
    use it to build deliberately bad bodies.
    """
    ordered = {k: (_canonical(v) if k == "payload" else v) for k, v in fields.items()}
    return msgpack.packb(ordered, **_PACK_OPTIONS)


def pack_payload(payload: Mapping[str, Any]) -> bytes:
    """The canonical msgpack of a payload: the bytes :func:`pack_body` writes under ``payload``."""
    return msgpack.packb(_canonical(payload), **_PACK_OPTIONS)


def pack_body_with_payload(header: Mapping[str, Any], packed_payload: bytes) -> bytes:
    """``pack_body({**header, "payload": payload})``, given ``packed_payload = pack_payload(payload)``.

    A msgpack map is its entry count followed by each key and value in order, so a payload
    packed once can follow the other fields' bytes. A sender that seals one update for several
    partners (the simulator's fanout, unsigned) then packs the tensor once, not once per partner;
    a test checks the bytes equal :func:`pack_body`'s.
    """
    if "payload" in header:
        raise ValueError("header must not contain 'payload'; it is appended last")
    count = len(header)
    head = msgpack.packb(dict(header), **_PACK_OPTIONS)
    return b"".join((_map_header(count + 1), head[len(_map_header(count)) :], _PAYLOAD_KEY, packed_payload))


def _map_header(count: int) -> bytes:
    """msgpack's header of a map with ``count`` entries (fixmap, map16 or map32)."""
    if count < 16:
        return bytes((0x80 | count,))
    if count < 0x10000:
        return b"\xde" + count.to_bytes(2, "big")
    return b"\xdf" + count.to_bytes(4, "big")


def signing_bytes(kind: str, run_id: str, body: bytes | memoryview) -> bytes:
    """The exact bytes the signature covers: domain, kind and run separate envelopes by use."""
    return b"".join((DOMAIN, kind.encode("utf-8"), b"\x00", run_id.encode("utf-8"), b"\x00", body))


def _bin_header(length: int) -> bytes:
    if length < 0x100:
        return b"\xc4" + length.to_bytes(1, "big")
    if length < 0x10000:
        return b"\xc5" + length.to_bytes(2, "big")
    return b"\xc6" + length.to_bytes(4, "big")


def pack_wire(body: bytes, signature: bytes) -> bytes:
    """The wire bytes ``[body, sig]``, with the shortest bin headers (the only accepted form)."""
    return b"".join((b"\x92", _bin_header(len(body)), body, _bin_header(len(signature)), signature))


# --- sealing -----------------------------------------------------------------------------


def seal(
    identity: Identity,
    *,
    kind: str,
    run_id: str,
    round: int,
    seq: int,
    timestamp: float,
    payload: dict[str, Any],
) -> bytes:
    """Sign and encode one message. Raises ValueError for arguments a receiver would refuse."""
    if kind not in KIND_SCHEMAS:
        raise ValueError(f"kind {kind!r} is not registered (known: {', '.join(sorted(KIND_SCHEMAS))})")
    _check_run_id(run_id)
    for name, value in (("round", round), ("seq", seq)):
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= INT64_MAX:
            raise ValueError(f"{name} must be an int in [0, 2**63-1], got {value!r}")
    if isinstance(timestamp, bool) or not isinstance(timestamp, (int, float)):
        raise ValueError(f"timestamp must be a number, got {type(timestamp).__name__}")
    timestamp = float(timestamp)
    if not math.isfinite(timestamp):
        raise ValueError(f"timestamp must be finite, got {timestamp!r}")
    try:
        validate_payload(kind, payload)
    except (SchemaViolation, NonFinite) as exc:
        raise ValueError(f"payload for kind {kind!r} is invalid: {exc.detail}") from None
    body = pack_body(
        {
            "v": PROTOCOL_VERSION,
            "kind": kind,
            "run": run_id,
            "sender": identity.public_key_bytes,
            "round": round,
            "seq": seq,
            "ts": timestamp,
            "payload": payload,
        }
    )
    return pack_wire(body, identity.sign(signing_bytes(kind, run_id, body)))


def _check_run_id(run_id: str) -> None:
    if not isinstance(run_id, str) or not 1 <= len(run_id) <= MAX_RUN_LEN or "\x00" in run_id:
        raise ValueError(f"run_id must be 1-{MAX_RUN_LEN} characters without NUL, got {run_id!r}")


# --- opening -----------------------------------------------------------------------------


class _ExtTypeRefused(Exception):
    pass


def _refuse_ext(code: int, data: bytes) -> Any:
    raise _ExtTypeRefused(f"ext type {code} is not allowed")


def _unique_map(pairs: list[tuple[Any, Any]]) -> dict[Any, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        raise ValueError("duplicate map key")
    return result


_BIN_WIDTHS = {0xC4: 1, 0xC5: 2, 0xC6: 4}
"""Length bytes after each msgpack bin marker (bin8, bin16, bin32)."""


def _read_bin(data: memoryview, offset: int, name: str) -> tuple[memoryview, int]:
    """Parse one msgpack bin at ``offset`` (shortest header only); return (view, next offset)."""
    if offset >= len(data):
        raise Malformed(f"{name}: missing (message truncated)")
    marker = data[offset]
    width = _BIN_WIDTHS.get(marker)
    if width is None:
        raise Malformed(f"{name}: expected a msgpack bin, got marker 0x{marker:02x}")
    start = offset + 1 + width
    if start > len(data):
        raise Malformed(f"{name}: truncated length")
    length = int.from_bytes(data[offset + 1 : start], "big")
    if width > 1 and length < 1 << (8 * width // 2):
        raise Malformed(f"{name}: non-canonical (longer than needed) bin header")
    end = start + length
    if end > len(data):
        raise Malformed(f"{name}: declares {length} bytes, only {len(data) - start} left (truncated)")
    return data[start:end], end


def _decode_outer(data: bytes) -> tuple[memoryview, bytes]:
    """Split ``[body, sig]`` without copying the body (it may be tens of MiB).

    The wrapper has one shape, so it is parsed by hand: array of 2, then two bins, each
    with the shortest header, and nothing after. Equal messages are therefore equal bytes.
    """
    view = memoryview(data)
    if len(view) == 0 or view[0] != 0x92:
        raise Malformed("message: expected a msgpack 2-element array [body, sig] (first byte 0x92)")
    body, offset = _read_bin(view, 1, "body")
    sig, offset = _read_bin(view, offset, "sig")
    if offset != len(view):
        raise Malformed(f"message: {len(view) - offset} trailing bytes after [body, sig]")
    return body, bytes(sig)


def _decode_body(body: memoryview) -> dict[str, Any]:
    n = len(body)
    try:
        decoded = msgpack.unpackb(
            body,
            raw=False,
            strict_map_key=True,
            use_list=True,
            max_bin_len=n,
            max_str_len=n,
            max_array_len=n,
            max_map_len=n // 2,
            max_ext_len=0,
            ext_hook=_refuse_ext,
            object_pairs_hook=_unique_map,
        )
    except Exception as exc:  # untrusted bytes: any decoder failure is the sender's fault
        raise Malformed(f"body: not decodable msgpack ({type(exc).__name__}: {exc})"[:200]) from None
    if not isinstance(decoded, dict):
        raise Malformed(f"body: expected a map, got {type(decoded).__name__}")
    return decoded


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_header(body: dict[str, Any], sig: bytes) -> None:
    if body.keys() != _HEADER_SET:  # one set comparison for the usual case; find the culprit only if not
        extra = [k for k in body if k not in HEADER_FIELDS]
        if extra:
            raise SchemaViolation(f"{extra[0]}: unexpected field")
        missing = [k for k in HEADER_FIELDS if k not in body]
        if missing:
            raise SchemaViolation(f"{missing[0]}: missing field")
    kind, run = body["kind"], body["run"]
    if not isinstance(kind, str) or not 1 <= len(kind) <= MAX_KIND_LEN or "\x00" in kind:
        raise SchemaViolation(f"kind: expected a str of 1-{MAX_KIND_LEN} chars without NUL, got {kind!r:.80}")
    if not isinstance(run, str) or not 1 <= len(run) <= MAX_RUN_LEN or "\x00" in run:
        raise SchemaViolation(f"run: expected a str of 1-{MAX_RUN_LEN} chars without NUL, got {run!r:.160}")
    sender = body["sender"]
    if not isinstance(sender, bytes) or len(sender) != PUBLIC_KEY_BYTES:
        raise SchemaViolation(f"sender: expected {PUBLIC_KEY_BYTES} bytes (Ed25519 public key)")
    for name in ("round", "seq"):
        value = body[name]
        if not _is_int(value) or not 0 <= value <= INT64_MAX:
            raise SchemaViolation(f"{name}: expected an int in [0, 2**63-1], got {value!r:.40}")
    if not isinstance(body["ts"], float):
        raise SchemaViolation(f"ts: expected float64 unix seconds, got {type(body['ts']).__name__}")
    if not isinstance(body["payload"], dict):
        raise SchemaViolation(f"payload: expected a map, got {type(body['payload']).__name__}")
    if len(sig) != SIGNATURE_BYTES:
        raise SchemaViolation(f"sig: expected {SIGNATURE_BYTES} bytes, got {len(sig)}")


def open_envelope(
    data: bytes,
    *,
    run_id: str,
    now: float,
    limits: EnvelopeLimits = EnvelopeLimits(),  # noqa: B008 - frozen, so sharing is safe
    replay_guard: ReplayGuard | None = None,
    verify_signature: bool = True,
) -> Envelope:
    """Check ``data`` against every rule of wire.md, in order; return the envelope or raise Reject.

    ``now`` is the receiver's clock (unix seconds). ``verify_signature=False`` is only for
    callers that produced the bytes themselves (the simulator's fast path): it skips
    rule 8 and nothing else. The replay guard records a pair only once the signature (if
    checked) has verified, so forged messages cannot fill it or shadow real ones.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"data must be bytes, got {type(data).__name__}")
    if not math.isfinite(now):
        raise ValueError(f"now must be finite, got {now!r}")
    # 1 [REJECT] oversize: bounded work before a single byte is decoded.
    if len(data) > limits.max_bytes:
        raise Oversize(f"message: {len(data)} bytes exceeds the limit of {limits.max_bytes}")
    data = bytes(data)
    # 2 [REJECT] malformed: wire wrapper is exactly [bin body, bin sig], shortest encoding.
    body_bytes, sig = _decode_outer(data)
    # 3 [REJECT] malformed: body is strict msgpack (no ext, no duplicate keys) and a map.
    body = _decode_body(body_bytes)
    # 4 [REJECT] version first: another version may have other fields, so this is not a schema fault.
    version = body.get("v")
    if not _is_int(version):
        raise SchemaViolation(f"v: expected int protocol version, got {type(version).__name__}")
    if version != PROTOCOL_VERSION:
        raise UnknownVersion(f"v: version {version} is not supported (this peer speaks {PROTOCOL_VERSION})")
    # 5 [REJECT] schema: exact header field set and types, sig length.
    _check_header(body, sig)
    kind, run = body["kind"], body["run"]
    # 6 [REJECT] unknown kind: we could not check its payload.
    if kind not in KIND_SCHEMAS:
        raise UnknownKind(f"kind: {kind!r} is not a known message kind")
    # 7 [REJECT] wrong run: addressed to another swarm.
    if run != run_id:
        raise WrongRun(f"run: message is for run {run!r}, this peer is in {run_id!r}")
    # 8 [REJECT] bad signature, over the received body bytes, before the payload is examined.
    if verify_signature and not _verify(body["sender"], sig, signing_bytes(kind, run, body_bytes)):
        raise BadSignature(f"sig: does not verify for sender {peer_id_from_public_key(body['sender'])}")
    # 9 [REJECT] timestamp: finite, and within the allowed skew of our clock.
    ts = body["ts"]
    if not math.isfinite(ts):
        raise NonFinite(f"ts: {ts!r} is not a finite number")
    if abs(ts - now) > limits.max_clock_skew_s:
        raise ClockSkew(
            f"ts: {ts!r} is {ts - now:+.3f} s from now={now!r} (limit ±{limits.max_clock_skew_s:g} s)"
        )
    # 10 [REJECT] replay: (sender, seq) seen within the window (recorded only after rule 8).
    if replay_guard is not None:
        replay_guard.check_and_record(body["sender"], body["seq"], ts, now)
    # 11-12 [REJECT] payload schema, then non-finite floats inside it.
    validate_payload(
        kind,
        body["payload"],
        max_depth=limits.max_payload_depth,
        max_opaque_items=limits.max_opaque_items,
    )
    return Envelope(
        version=version,
        kind=kind,
        run_id=run,
        sender=body["sender"],
        round=body["round"],
        seq=body["seq"],
        timestamp=ts,
        payload=body["payload"],
        signature=sig,
    )
