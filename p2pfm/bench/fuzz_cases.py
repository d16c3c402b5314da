"""The messages of ``p2pfm bench fuzz``: structure-aware mutations of valid ones, and valid controls.

Sans-IO: a :class:`MessageFactory` takes a seed, what it knows of the target (run id, model
size, round) and the time, and returns :class:`FuzzMessage` s, each with the exact bytes to
write on one stream and whether the peer's rules must accept it (``valid``). The same seed and
clock give the same messages, byte for byte (keys come from the seed, Ed25519 is deterministic).

Every mutation breaks a rule of ``protocols/wire.md`` or ``protocols/codecs.md`` *by
construction* (the tables below name the value and, as a comment, the rule), so any message
with ``valid=False`` that a peer accepts is a hole in its defences. Families:

- ``frame``: the length prefix lies (oversize, short body, no body, zero length);
- ``bytes``: bit flips, truncation, extension, insertion, deletion of a signed message,
  random bytes and random msgpack;
- ``header``: one envelope field of a wrong type or out of bounds (re-signed by its sender);
- ``envelope``: wrong run, wrong or unknown kind, other version, bad signatures, clock skew,
  NaN times, duplicate map keys, ext types, non-canonical wrappers, missing/extra fields;
- ``payload``: one payload field wrong, signed by a fresh key (so the signature holds);
- ``codec``: a broken tensor (unknown codec, wrong numel, bad k/block/value_bits, unsorted or
  out-of-range indices, overlong varints, NaN/Inf/negative scales, int8 -128, wrong lengths);
- ``round``: an update far beyond the round window, up to 2^63-1 (ignored, never used);
- ``replay``: a control's exact bytes again, or its (sender, seq) with new content;
- ``control`` (valid): updates in every codec and at every round of the window, one with its
  header fields reordered (receivers verify the bytes received), state and params requests.
"""

from __future__ import annotations

import math
import random
import struct
from dataclasses import dataclass, field, replace
from typing import Any

import msgpack
import numpy as np

from p2pfm.core.codecs import CodecSpec, encode, varint_encode
from p2pfm.core.envelope import pack_body, pack_wire, seal, signing_bytes
from p2pfm.core.gossip import GossipConfig, future_window
from p2pfm.core.identity import Identity
from p2pfm.core.protocol import MAX_INNER_STEPS
from p2pfm.core.schema import INT64_MAX

STREAMS = ("gossip", "state", "params")
STREAM_KINDS = {"gossip": "update", "state": "state_request", "params": "state_request"}
REQUEST_FRAME_BYTES = 4096  # p2pfm.daemon.handlers.REQUEST_FRAME_BYTES (not imported: no daemon deps here)
FRAME_HEADER = 4


@dataclass(frozen=True)
class TargetInfo:
    """What the factory must know of the target: its run, model size, round and limits."""

    run_id: str
    numel: int
    round: int = 0
    max_message_bytes: int = 64 << 20  # the gossip stream's frame limit (net.max_message_bytes)
    max_round_lag: int = GossipConfig().max_round_lag  # the target's window (default config)


@dataclass(frozen=True)
class FuzzMessage:
    """One stream's worth of bytes, and what the target's rules must do with them."""

    index: int
    stream: str  # gossip, state or params
    family: str  # frame, bytes, header, envelope, payload, codec, round, replay, control
    case: str  # e.g. "payload.weight=-1.0"
    frame: bytes  # written as is: the length prefix is part of it (and may lie)
    valid: bool  # the rules accept it (an answer, or ok: true)
    expect_answer: bool = True  # False: the frame is incomplete; we close at once
    nonce: bytes | None = None  # a control request's nonce, echoed by a params answer
    member: bool = False  # signed by the member key: send it from the transport that key announced
    key: Identity | None = field(default=None, compare=False, repr=False)  # a control's signer (replays)


def frame_of(data: bytes) -> bytes:
    return len(data).to_bytes(FRAME_HEADER, "big") + data


def _pack(value: Any) -> bytes:
    return msgpack.packb(value, use_bin_type=True)


# --- invalid values, by field (each breaks the rule named beside it) ---------------------------
_BAD_INTS = [-1, -(2**63), 2**63, 2**64 - 1, 1.5, "0", None, True, b"\x00"]  # schema: int in [0, 2^63-1]
BAD_HEADER: dict[str, list[Any]] = {
    "v": [0, 2, 255, -1, 2**63, "1", 1.0, None, True, b"\x01"],  # unknown_version / schema
    "kind": ["", "k" * 65, "up\x00date", 7, None, b"update", ["update"]],  # schema
    "run": ["", "r" * 129, "run\x00x", 1, None, b"run"],  # schema (wrong_run for a str of the right size)
    "sender": [b"", b"\x00" * 31, b"\x00" * 33, "k" * 32, None, 0],  # schema: 32-byte public key
    "round": _BAD_INTS,
    "seq": _BAD_INTS,
    "ts": [0, 1_700_000_000, "now", None, True, b"\x00" * 8, [1.0]],  # schema: float64
    "payload": [None, [], "payload", 0, b"", 1.5],  # schema: a map
}
BAD_UPDATE_FIELDS: dict[str, list[Any]] = {
    "weight": [-1.0, -5e-324, -math.inf, math.nan, math.inf, 1, "1", None, b"", []],  # schema / non_finite
    "inner_steps": [0, -1, MAX_INNER_STEPS + 1, INT64_MAX, 1.0, True, "1", None],  # bad_update / schema
    "train_loss": [math.nan, math.inf, -math.inf, 0, "0", None, b""],  # non_finite / schema
    "model_hash": [b"", b"\x00" * 31, b"\x00" * 33, "h" * 32, None, 0],  # schema: 32 bytes
    "tensor": [None, [], "tensor", 0, b"", {}, {"codec": None}],  # schema
}
BAD_REQUEST_FIELDS: dict[str, list[Any]] = {
    "round": [-1, 2**64 - 1, 1.5, "0", None, True],  # schema
    "nonce": [b"", b"\x00" * 15, b"\x00" * 17, "n" * 16, None, 0],  # schema: 16 bytes
}
BAD_CODEC_FIELDS: dict[str, list[Any]] = {
    "codec": ["zstd", "", "TOPK", "topk\x00", 5, None, b"topk"],  # unknown_codec / schema
    "numel": [-1, 0, 2**32 + 1, 2**40, INT64_MAX, "1", 1.0, True, None],  # shape_mismatch / oversize / schema
}
UNKNOWN_KINDS = ["gradient", "UPDATE", "update2", "state-request", "x" * 64]
OTHER_RUNS = ["other-run", "p2pfm-default", "x" * 128]


def _random_value(rng: random.Random, depth: int = 0) -> Any:
    """A random msgpack-able value (maps, lists, odd ints and floats, bytes, strings)."""
    choice = rng.randrange(9 if depth < 3 else 6)
    if choice == 0:
        return None
    if choice == 1:
        return rng.random() < 0.5
    if choice == 2:
        return rng.choice([0, -1, 1, INT64_MAX, -(2**63), 2**64 - 1, rng.randrange(-1000, 1000)])
    if choice == 3:
        return rng.choice([0.0, -0.0, math.nan, math.inf, -math.inf, 1e308, rng.uniform(-1e6, 1e6)])
    if choice == 4:
        return "".join(rng.choice("abc\x00é/") for _ in range(rng.randrange(0, 40)))
    if choice == 5:
        return rng.randbytes(rng.choice([0, 16, 32, 64, rng.randrange(0, 100)]))
    if choice in (6, 7):
        keys = ["v", "kind", "run", "sender", "round", "seq", "ts", "payload", "tensor", "codec"]
        return {rng.choice(keys): _random_value(rng, depth + 1) for _ in range(rng.randrange(0, 9))}
    return [_random_value(rng, depth + 1) for _ in range(rng.randrange(0, 6))]


class MessageFactory:
    """Deterministic fuzz messages for one target: ``next(now)`` gives the next one.

    ``control_fraction`` of them are valid controls; the rest are invalid by construction.
    Replays copy controls the runner reported delivered (:meth:`delivered`): a control still
    in flight could arrive after its replay, and the replay would rightly be accepted.

    Members: a peer only looks past the envelope (membership, rates, update metadata, round
    window, codec) for keys that announced themselves. When the runner sets :attr:`member`
    (a key it announced), controls and the key-level families (``codec``, ``round`` on the
    gossip stream) are signed by it and marked ``member``; otherwise by the seed's control key
    and fresh keys (the in-process tests, whose peer knows no member list).
    """

    FAMILIES = ("frame", "bytes", "header", "envelope", "payload", "codec", "round", "replay")
    WEIGHTS = (6, 20, 12, 20, 14, 20, 3, 5)

    def __init__(
        self, seed: int, target: TargetInfo, *, start: float, control_fraction: float = 0.02
    ) -> None:
        self.rng = random.Random(seed)
        self.target = target
        self.control_fraction = control_fraction
        self.control_key = self._fresh_key()
        self.control_seq = int(start * 1e6)  # unique across campaigns on one target (microseconds)
        self._control_round: dict[str, int] = {}  # per key: an honest peer's rounds never go back
        self.index = 0
        self._delivered: list[FuzzMessage] = []
        self.member: Identity | None = None  # set by the runner: an announced key
        # Valid updates claim rounds this far ahead of the target's last known round (controls: half
        # to 1.5x as far): inside its window [round - lag, round + 4 lag] from both sides, for a
        # target that moves on by up to 1.5 * lag rounds before they arrive.
        self.ahead = 2 * max(1, target.max_round_lag)
        self._wires = self._codec_wires(np.random.default_rng(seed))

    # --- what the runner tells us ----------------------------------------------------------
    def retarget(self, round: int) -> None:
        """The target's round moved (a training target): controls and windows follow it."""
        self.target = replace(self.target, round=round)

    def delivered(self, message: FuzzMessage) -> None:
        """A control was accepted: its bytes and (sender, seq) may now be replayed."""
        if message.family == "control" and message.key is not None:
            self._delivered.append(message)
            del self._delivered[:-256]

    # --- the stream of messages ----------------------------------------------------------------
    def next(self, now: float, *, stream: str | None = None, control: bool | None = None) -> FuzzMessage:
        rng = self.rng
        stream = stream or rng.choice(STREAMS)
        if control is None:
            control = rng.random() < self.control_fraction
        if control:
            message = self._control(stream, now)
        else:
            family = rng.choices(self.FAMILIES, self.WEIGHTS)[0]
            message = getattr(self, f"_{family}")(stream, now)
        self.index += 1
        return replace(message, index=self.index - 1)

    def _msg(self, stream: str, family: str, case: str, data: bytes, **kw: Any) -> FuzzMessage:
        return FuzzMessage(0, stream, family, case, frame_of(data), kw.pop("valid", False), **kw)

    def _fresh_key(self) -> Identity:
        return Identity.from_private_bytes(self.rng.randbytes(32))

    def _seq(self) -> int:
        return self.rng.randrange(0, INT64_MAX)

    # --- valid building blocks --------------------------------------------------------------------
    def _codec_wires(self, nrng: np.random.Generator) -> dict[str, dict]:
        vector = (nrng.standard_normal(self.target.numel) * 1e-3).astype(np.float32)
        specs = {
            "none": CodecSpec(name="none"),
            "fp16": CodecSpec(name="fp16"),
            "int8": CodecSpec(name="int8"),
            "topk": CodecSpec(name="topk"),
            "topk16": CodecSpec(name="topk", value_bits=16),
        }
        return {name: encode(vector, spec) for name, spec in specs.items()}

    def _update_payload(self, codec: str | None = None) -> dict[str, Any]:
        rng = self.rng
        codec = codec or rng.choice(sorted(self._wires))
        return {
            "tensor": dict(self._wires[codec]),
            "weight": float(rng.choice([0.0, 1.0, 16.0, rng.uniform(0, 1e6)])),
            "inner_steps": rng.choice([1, 10, MAX_INNER_STEPS]),
            "train_loss": rng.choice([0.0, -1.0, 5.5, rng.uniform(-1e6, 1e6)]),
            "model_hash": rng.randbytes(32),
        }

    def _request_payload(self) -> dict[str, Any]:
        return {"round": self.rng.choice([0, self.target.round]), "nonce": self.rng.randbytes(16)}

    def _payload_for(self, kind: str) -> dict[str, Any]:
        return self._update_payload() if kind == "update" else self._request_payload()

    def _fields(self, key: Identity, kind: str, payload: Any, now: float, **header: Any) -> dict[str, Any]:
        fields = {
            "v": 1, "kind": kind, "run": self.target.run_id, "sender": key.public_key_bytes,
            "round": self.target.round + self.ahead, "seq": self._seq(), "ts": float(now), "payload": payload,
        }  # fmt: skip
        fields.update(header)
        return fields

    def _signed(
        self, key: Identity, fields: dict[str, Any], *, sign_kind: str = "", sign_run: str = ""
    ) -> bytes:
        """``[body, sig]`` with a signature by ``key`` over the body's own kind and run (when they are
        strings; else over ``sign_kind``/``sign_run``): only the broken field is wrong."""
        body = pack_body(fields)
        kind = fields.get("kind") if isinstance(fields.get("kind"), str) else sign_kind or "update"
        run = fields.get("run") if isinstance(fields.get("run"), str) else sign_run or self.target.run_id
        return pack_wire(body, key.sign(signing_bytes(kind, run, body)))

    def _valid(self, stream: str, now: float, key: Identity | None = None) -> bytes:
        """A valid message for ``stream`` by a fresh key (mutations start from one)."""
        kind = STREAM_KINDS[stream]
        key = key or self._fresh_key()
        return self._signed(key, self._fields(key, kind, self._payload_for(kind), now))

    # --- controls (valid) ---------------------------------------------------------------------
    def _deep_key(self, stream: str) -> tuple[Identity, bool]:
        """The signer of a message whose envelope is valid: the member key (if any) on gossip."""
        if self.member is not None and stream == "gossip":
            return self.member, True
        return self._fresh_key(), False

    def _control(self, stream: str, now: float) -> FuzzMessage:
        message = self._control_message(stream, now)
        return replace(message, member=self.member is not None, key=self.member or self.control_key)

    def _control_message(self, stream: str, now: float) -> FuzzMessage:
        rng, key = self.rng, self.member or self.control_key
        self.control_seq += 1
        if stream == "gossip":
            round_ = self.target.round + rng.randrange(self.ahead // 2, self.ahead * 3 // 2 + 1)
            round_ = max(round_, self._control_round.get(key.peer_id, 0))  # else: round_regression
            self._control_round[key.peer_id] = round_
            codec = rng.choice(sorted(self._wires))
            payload = self._update_payload(codec)
            fields = self._fields(key, "update", payload, now, round=round_, seq=self.control_seq)
            if rng.random() < 0.2:  # field order is not a rule: the bytes received are verified
                order = list(fields)
                rng.shuffle(order)
                data = self._signed(key, {k: fields[k] for k in order})
                return self._msg(stream, "control", "control.reordered_header", data, valid=True)
            data = self._signed(key, fields)
            return self._msg(stream, "control", f"control.update.{codec}", data, valid=True)
        nonce = rng.randbytes(16)
        data = seal(
            key, kind="state_request", run_id=self.target.run_id, round=self.target.round,
            seq=self.control_seq, timestamp=now, payload={"round": self.target.round, "nonce": nonce},
        )  # fmt: skip
        return self._msg(stream, "control", "control.state_request", data, valid=True, nonce=nonce)

    # --- families of invalid messages ---------------------------------------------------------
    def _frame(self, stream: str, now: float) -> FuzzMessage:
        rng = self.rng
        limit = self.target.max_message_bytes if stream == "gossip" else REQUEST_FRAME_BYTES
        valid = self._valid(stream, now)
        case = rng.choice(["oversize_header", "oversize_body", "short_body", "header_only", "partial_header",
                           "zero_length", "nothing"])  # fmt: skip
        if case == "oversize_body" and stream == "gossip":
            case = "oversize_header"  # 64 MiB bodies would only measure loopback's bandwidth
        if case == "oversize_header":  # [REJECT] oversize, before the body is read
            length = rng.choice([limit + 1, limit + rng.randrange(2, 1 << 20), 2**31, 2**32 - 1])
            return FuzzMessage(0, stream, "frame", case, length.to_bytes(4, "big"), False)
        if case == "oversize_body":  # [REJECT] oversize: a real body over the request limit
            data = valid + rng.randbytes(limit + 1 - len(valid) + rng.randrange(0, 2048))
            return FuzzMessage(0, stream, "frame", case, frame_of(data), False)
        if case == "zero_length":  # [REJECT] malformed: an empty message
            return FuzzMessage(0, stream, "frame", case, frame_of(b""), False)
        # The rest never complete a frame: the peer cannot answer, and we close at once.
        if case == "short_body":
            data = (len(valid) + rng.randrange(1, 64)).to_bytes(4, "big") + valid
        elif case == "header_only":
            data = len(valid).to_bytes(4, "big")
        elif case == "partial_header":
            data = len(valid).to_bytes(4, "big")[: rng.randrange(1, 4)]
        else:
            data = b""
        return FuzzMessage(0, stream, "frame", case, data, False, expect_answer=False)

    def _bytes(self, stream: str, now: float) -> FuzzMessage:
        rng = self.rng
        original = self._valid(stream, now)
        data = bytearray(original)
        case = rng.choice(
            ["bitflip", "byteflip", "truncate", "extend", "insert", "delete", "random", "msgpack"]
        )
        if case == "bitflip":  # every byte is signed or structural: any change breaks a rule
            for _ in range(rng.randrange(1, 4)):
                data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        elif case == "byteflip":
            for _ in range(rng.randrange(1, 8)):
                data[rng.randrange(len(data))] ^= rng.randrange(1, 256)
        elif case == "truncate":  # [REJECT] malformed: the wrapper is exact
            del data[rng.randrange(len(data)) :]
        elif case == "extend":  # [REJECT] malformed: trailing bytes
            data += rng.randbytes(rng.randrange(1, 64))
        elif case == "insert":
            at = rng.randrange(len(data) + 1)
            data[at:at] = rng.randbytes(rng.randrange(1, 16))
        elif case == "delete":
            at = rng.randrange(len(data))
            del data[at : at + rng.randrange(1, 16)]
        elif case == "random":
            data = bytearray(rng.randbytes(rng.randrange(0, 600)))
        else:
            try:
                raw = _pack(_random_value(rng))
            except (TypeError, ValueError, OverflowError):
                raw = b"\xc0"
            data = bytearray(pack_wire(raw, rng.randbytes(64)) if rng.random() < 0.5 else raw)
        if data == original:  # flips that cancel out (the same bit twice) leave a valid message
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        return self._msg(stream, "bytes", f"bytes.{case}", bytes(data))

    def _header(self, stream: str, now: float) -> FuzzMessage:
        rng = self.rng
        kind = STREAM_KINDS[stream]
        key = self._fresh_key()
        field = rng.choice(sorted(BAD_HEADER))
        value = rng.choice(BAD_HEADER[field])
        fields = self._fields(key, kind, self._payload_for(kind), now)
        fields[field] = value
        return self._msg(stream, "header", f"header.{field}={_short(value)}", self._signed(key, fields))

    def _envelope(self, stream: str, now: float) -> FuzzMessage:
        rng = self.rng
        kind = STREAM_KINDS[stream]
        key = self._fresh_key()
        fields = self._fields(key, kind, self._payload_for(kind), now)
        case = rng.choice(["wrong_run", "wrong_kind", "unknown_kind", "sig_other_key", "sig_domain", "sig_zero",
                           "sig_length", "sig_flip", "clock_skew", "ts_non_finite", "duplicate_key",
                           "duplicate_payload_key", "ext_type", "noncanonical_wrapper", "wrapper_shape",
                           "missing_field", "extra_field", "body_not_map", "bad_utf8", "deep_payload",
                           "wide_payload"])  # fmt: skip
        if case == "wrong_run":  # [REJECT] wrong_run, properly signed for the other run
            fields["run"] = rng.choice(OTHER_RUNS)
            data = self._signed(key, fields)
        elif case == "wrong_kind":  # [REJECT] wrong_kind: a valid message of a kind this stream does not take
            other = rng.choice([k for k in ("update", "state_request", "announce", "state_manifest",
                                            "params_sync") if k != kind])  # fmt: skip
            data = self._signed(key, self._fields(key, other, self._other_payload(other), now))
            case = f"wrong_kind.{other}"
        elif case == "unknown_kind":  # [REJECT] unknown_kind, signed over that kind
            fields["kind"] = rng.choice(UNKNOWN_KINDS)
            data = self._signed(key, fields)
        elif case == "sig_other_key":  # [REJECT] bad_signature
            body = pack_body(fields)
            data = pack_wire(body, self._fresh_key().sign(signing_bytes(kind, self.target.run_id, body)))
        elif case == "sig_domain":  # [REJECT] bad_signature: signed for another kind or run, or raw
            body = pack_body(fields)
            other_kind = rng.choice([k for k in ("update", "state_request", "announce") if k != kind])
            signed = rng.choice([signing_bytes(other_kind, self.target.run_id, body),
                                 signing_bytes(kind, "other-run", body), body])  # fmt: skip
            data = pack_wire(body, key.sign(signed))
        elif case == "sig_zero":
            data = pack_wire(pack_body(fields), bytes(64))
        elif case == "sig_length":  # [REJECT] schema: sig must be 64 bytes
            sig = key.sign(signing_bytes(kind, self.target.run_id, pack_body(fields)))
            data = pack_wire(pack_body(fields), rng.choice([sig[:63], sig + b"\x00", b""]))
        elif case == "sig_flip":
            sig = bytearray(key.sign(signing_bytes(kind, self.target.run_id, pack_body(fields))))
            sig[rng.randrange(64)] ^= 1 << rng.randrange(8)
            data = pack_wire(pack_body(fields), bytes(sig))
        elif case == "clock_skew":  # [REJECT] clock_skew: beyond ±120 s (with room for delivery)
            fields["ts"] = now + rng.choice([-1, 1]) * rng.uniform(150.0, 1e9)
            data = self._signed(key, fields)
        elif case == "ts_non_finite":  # [REJECT] non_finite
            fields["ts"] = rng.choice([math.nan, math.inf, -math.inf])
            data = self._signed(key, fields)
        elif case in ("duplicate_key", "duplicate_payload_key"):  # [REJECT] malformed
            data = self._duplicate_key(key, fields, payload=case == "duplicate_payload_key")
        elif case == "ext_type":  # [REJECT] malformed: no ext types
            target = fields["payload"] if rng.random() < 0.5 else fields
            target[rng.choice(sorted(target))] = msgpack.ExtType(rng.randrange(0, 128), rng.randbytes(4))
            body = msgpack.packb(fields, use_bin_type=True)
            data = pack_wire(body, key.sign(signing_bytes(kind, self.target.run_id, body)))
        elif case == "noncanonical_wrapper":  # [REJECT] malformed: shortest bin headers only
            body = pack_body(fields)
            sig = key.sign(signing_bytes(kind, self.target.run_id, body))
            data = b"\x92" + b"\xc6" + len(body).to_bytes(4, "big") + body + b"\xc4\x40" + sig
            if len(body) >= 1 << 16:
                data = b"\x92" + b"\xc6" + len(body).to_bytes(4, "big") + body + b"\xc5\x00\x40" + sig
        elif case == "wrapper_shape":  # [REJECT] malformed: exactly [bin, bin]
            body = pack_body(fields)
            sig = key.sign(signing_bytes(kind, self.target.run_id, body))
            data = rng.choice([_pack([body, sig, b""]), _pack([body]), _pack({"body": body, "sig": sig}),
                               _pack([body.decode("latin-1"), sig]), _pack([sig, body])])  # fmt: skip
        elif case == "missing_field":  # [REJECT] schema
            del fields[rng.choice([k for k in fields if k not in ("kind", "run")])]
            data = self._signed(key, fields)
        elif case == "extra_field":  # [REJECT] schema
            fields[rng.choice(["x", "sig", "version", "V"])] = rng.choice([0, "x", None])
            data = self._signed(key, fields)
        elif case == "body_not_map":  # [REJECT] malformed
            body = _pack(rng.choice([list(fields.values()), 1, "body", None]))
            data = pack_wire(body, key.sign(signing_bytes(kind, self.target.run_id, body)))
        elif case == "bad_utf8":  # [REJECT] malformed: a str that is not UTF-8
            body = pack_body(fields).replace(b"\xa3run", b"\xa3r\xffn", 1)
            data = pack_wire(body, key.sign(signing_bytes(kind, self.target.run_id, body)))
        elif case == "deep_payload":  # [REJECT] schema: nesting beyond max_payload_depth (8)
            nested: Any = 1
            for _ in range(rng.randrange(9, 40)):
                nested = {"x": nested} if rng.random() < 0.5 else [nested]
            field = "tensor" if kind == "update" else "nonce"
            fields["payload"][field] = {"codec": "none", "deep": nested} if kind == "update" else nested
            data = self._signed(key, fields)
        else:  # wide_payload: [REJECT] schema: more than max_opaque_items (4096) nodes in the tensor map
            if kind == "update":
                fields["payload"]["tensor"] = {f"k{i}": i for i in range(4097 + rng.randrange(0, 100))}
            else:
                fields["payload"]["nonce"] = list(range(5000))
            data = self._signed(key, fields)
        return self._msg(stream, "envelope", f"envelope.{case}", data)

    def _other_payload(self, kind: str) -> dict[str, Any]:
        rng = self.rng
        if kind in ("update", "state_request"):
            return self._payload_for(kind)
        if kind == "announce":
            return {"libp2p_id": "12D3KooWFuzz", "maddrs": ["/ip4/127.0.0.1/tcp/1"], "round": 0,
                    "model_hash": rng.randbytes(32), "device_class": "fuzz", "power_w": 1.0, "state_bytes": 100}  # fmt: skip
        if kind == "state_manifest":
            return {"round": 0, "model_hash": rng.randbytes(32), "total_bytes": 8, "chunk_size": 4,
                    "chunk_hashes": [rng.randbytes(32), rng.randbytes(32)]}  # fmt: skip
        return {"tensor": dict(self._wires["int8"]), "round": 0, "nonce": rng.randbytes(16)}

    def _duplicate_key(self, key: Identity, fields: dict[str, Any], *, payload: bool) -> bytes:
        """A map with one key twice, built by hand (msgpack dicts cannot hold it), then signed."""
        if payload:
            inner = fields["payload"]
            name = self.rng.choice(sorted(inner))
            packed = _map_header(len(inner) + 1) + b"".join(
                _pack(k) + _pack(v) for k, v in sorted(inner.items())
            ) + _pack(name) + _pack(inner[name])  # fmt: skip
            head = {k: v for k, v in fields.items() if k != "payload"}
            body = _map_header(len(head) + 1) + b"".join(_pack(k) + _pack(v) for k, v in head.items())
            body += _pack("payload") + packed
        else:
            name = self.rng.choice(sorted(fields))
            items = list(fields.items()) + [(name, fields[name])]
            body = _map_header(len(items)) + b"".join(_pack(k) + _pack(v) for k, v in items)
        return pack_wire(body, key.sign(signing_bytes(fields["kind"], fields["run"], body)))

    def _payload(self, stream: str, now: float) -> FuzzMessage:
        rng = self.rng
        kind = STREAM_KINDS[stream]
        key = self._fresh_key()
        payload = self._payload_for(kind)
        table = BAD_UPDATE_FIELDS if kind == "update" else BAD_REQUEST_FIELDS
        action = rng.choice(["value", "value", "value", "missing", "extra"])
        if action == "value":
            field = rng.choice(sorted(table))
            value = rng.choice(table[field])
            payload[field] = value
            case = f"payload.{field}={_short(value)}"
        elif action == "missing":  # [REJECT] schema
            field = rng.choice(sorted(payload))
            del payload[field]
            case = f"payload.missing.{field}"
        else:  # [REJECT] schema
            payload[rng.choice(["x", "extra", "Tensor", "sees"])] = rng.choice([0, "x", None, b""])
            case = "payload.extra_field"
        data = self._signed(key, self._fields(key, kind, payload, now))
        return self._msg(stream, "payload", case, data)

    def _codec(self, stream: str, now: float) -> FuzzMessage:
        """A broken tensor in an otherwise valid, signed update (to the gossip stream; elsewhere the
        update is also refused, as the wrong kind)."""
        rng = self.rng
        key, member = self._deep_key(stream)
        codec = rng.choice(sorted(self._wires))
        payload = self._update_payload(codec)
        if rng.random() < 0.1:  # [REJECT] bad_update: inner_steps outside [1, 2^20] (a schema-valid int)
            payload["inner_steps"] = rng.choice([0, MAX_INNER_STEPS + 1, INT64_MAX])
            case = f"meta.inner_steps={payload['inner_steps']}"
        else:
            payload["tensor"], case = self._bad_wire(codec)
            case = f"codec.{codec}.{case}"
        data = self._signed(key, self._fields(key, "update", payload, now))
        return self._msg(stream, "codec", case, data, member=member)

    def _bad_wire(self, codec: str) -> tuple[dict[str, Any], str]:
        rng = self.rng
        wire = dict(self._wires[codec])
        n = self.target.numel
        generic = ["field_value", "field_value", "missing_field", "extra_field", "field_type"]
        specific = {
            "none": ["values_length", "values_non_finite"],
            "fp16": ["values_length", "values_non_finite"],
            "int8": ["block", "scales_length", "scales_bad", "values_length", "int8_min"],
            "topk": ["k", "block", "value_bits", "scales_length", "scales_bad", "values_length", "int8_min",
                     "indices_dup", "indices_oob", "indices_overlong", "indices_truncated", "indices_long"],
            "topk16": ["k", "value_bits", "values_length", "values_non_finite", "indices_dup", "indices_oob",
                       "indices_overlong", "indices_truncated", "indices_long"],
        }  # fmt: skip
        case = rng.choice(generic + specific[codec] * 2)
        if case == "field_value":
            field = rng.choice(sorted(BAD_CODEC_FIELDS))
            value = rng.choice(BAD_CODEC_FIELDS[field] + ([n + 1, n - 1] if field == "numel" else []))
            wire[field] = value
            return wire, f"{field}={_short(value)}"
        if case == "missing_field":  # [REJECT] schema: exactly the codec's fields
            del wire[rng.choice(sorted(wire))]
        elif case == "extra_field":
            wire[rng.choice(["x", "scale", "shape", "k" if "k" not in wire else "block2"])] = 1
        elif case == "field_type":  # [REJECT] schema: exact msgpack types
            field = rng.choice(sorted(f for f in wire if f != "codec"))
            value = wire[field]
            wire[field] = rng.choice([str(value), None, [value]]) if isinstance(value, (int, bytes)) else 1
        elif case == "values_length":  # [REJECT] shape_mismatch
            wire["values"] = _resize(rng, wire["values"])
        elif case == "values_non_finite":  # [REJECT] non_finite
            width = 2 if codec in ("fp16", "topk16") else 4
            values = bytearray(wire["values"])
            at = rng.randrange(len(values) // width) * width
            bad = rng.choice([math.nan, math.inf, -math.inf])
            values[at : at + width] = struct.pack("<e" if width == 2 else "<f", bad)
            wire["values"] = bytes(values)
        elif case == "block":  # [REJECT] schema: block in [1, 2^20]
            wire["block"] = rng.choice([0, (1 << 20) + 1, 2**62])
        elif case == "scales_length":  # [REJECT] shape_mismatch
            wire["scales"] = _resize(rng, wire["scales"])
        elif (
            case == "scales_bad"
        ):  # [REJECT] non_finite / schema (negative) / non_finite (127*scale overflows)
            scales = bytearray(wire["scales"])
            bad = rng.choice([math.nan, math.inf, -1.0, -1e-30, 3e38])
            scales[0:4] = struct.pack("<f", bad)
            wire["scales"] = bytes(scales)
        elif case == "int8_min":  # [REJECT] schema: int8 values in [-127, 127]
            values = bytearray(wire["values"])
            values[rng.randrange(len(values))] = 0x80
            wire["values"] = bytes(values)
        elif case == "k":  # [REJECT] shape_mismatch: k in [1, numel] and matching the lengths
            wire["k"] = rng.choice([0, n + 1, wire["k"] + 1, wire["k"] - 1])
            if wire["k"] < 0:
                wire["k"] = 0
        elif case == "value_bits":  # [REJECT] schema: 8 or 16
            wire["value_bits"] = rng.choice([0, 4, 32, 7, "8", 8.0, None])
        elif case.startswith("indices_"):
            wire["indices"] = self._bad_indices(case, wire["k"], n)
        return wire, case

    def _bad_indices(self, case: str, k: int, n: int) -> bytes:
        """Index bytes for k positions that break one rule of topk's index stream."""
        rng = self.rng
        positions = sorted(rng.sample(range(n), k))
        gaps = np.diff(np.array(positions, dtype=np.uint64), prepend=np.uint64(0))
        if case == "indices_dup" and k >= 2:  # [REJECT] bad_index: a zero gap (not strictly increasing)
            gaps[rng.randrange(1, k)] = 0
        elif case == "indices_oob" or case == "indices_dup":  # [REJECT] bad_index: last index >= numel
            gaps[-1] += np.uint64(n)  # (a 1-entry dup falls back to this)
        elif case == "indices_overlong":  # [REJECT] bad_index: a varint with a redundant zero byte
            data = varint_encode(gaps)
            first_end = next(i for i, b in enumerate(data) if b < 0x80)
            return data[:first_end] + bytes([data[first_end] | 0x80, 0x00]) + data[first_end + 1 :]
        elif case == "indices_truncated":  # [REJECT] bad_index: last varint's continuation bit set
            data = varint_encode(gaps)
            return data[:-1] + bytes([data[-1] | 0x80])
        else:  # indices_long: [REJECT] shape_mismatch: more index bytes than k varints
            return varint_encode(gaps) + bytes(rng.randrange(1, 5 * k + 2))
        return varint_encode(gaps)

    def _round(self, stream: str, now: float) -> FuzzMessage:
        """An update beyond the round window: [IGNORE] future_round (or stale_round), never used."""
        rng = self.rng
        key, member = self._deep_key(stream)
        ahead = self.target.round + future_window(GossipConfig(max_round_lag=self.target.max_round_lag))
        choices = [
            ahead + 1000 + rng.randrange(1 << 20),
            (1 << 40) + rng.randrange(1 << 20),
            2**62,
            INT64_MAX,
        ]
        case = "future"
        round_ = rng.choice(choices)
        if self.target.round > self.target.max_round_lag + 1000 and rng.random() < 0.3:
            round_, case = self.target.round - self.target.max_round_lag - 1000, "stale"
        data = self._signed(key, self._fields(key, "update", self._update_payload(), now, round=round_))
        return self._msg(stream, "round", f"round.{case}", data, member=member)

    def _replay(self, stream: str, now: float) -> FuzzMessage:
        """[REJECT] replay: a delivered control's bytes again, or its (sender, seq) with new content."""
        rng = self.rng
        if not self._delivered:  # nothing delivered yet: a replay of an update the peer never saw is
            return self._bytes(stream, now)  # no replay; fall back to another family
        original = rng.choice(self._delivered)
        if rng.random() < 0.5:
            return replace(original, family="replay", case="replay.same_bytes", valid=False, nonce=None,
                           member=False, key=None)  # fmt: skip
        body = msgpack.unpackb(original.frame[FRAME_HEADER:], raw=False)[0]
        fields = msgpack.unpackb(body, raw=False)
        fields["ts"] = float(now)
        fields["payload"] = self._payload_for(fields["kind"])
        data = self._signed(original.key, fields)
        return FuzzMessage(0, original.stream, "replay", "replay.same_seq", frame_of(data), False)


def _map_header(count: int) -> bytes:
    if count < 16:
        return bytes((0x80 | count,))
    return b"\xde" + count.to_bytes(2, "big")


def _resize(rng: random.Random, data: bytes) -> bytes:
    """``data`` one or more bytes shorter or longer (never the same length)."""
    if data and rng.random() < 0.5:
        return data[: -rng.randrange(1, min(len(data), 8) + 1)]
    return data + rng.randbytes(rng.randrange(1, 9))


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 24 else text[:21] + "..."
