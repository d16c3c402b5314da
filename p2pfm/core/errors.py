"""Typed refusals for everything that arrives from the wire.

Every check in the envelope, the schemas and the codecs raises a subclass of
:class:`Reject` that names its :class:`RejectReason`; a peer counts rejections by reason
(metrics) and lowers the sender's score. Nothing here is ever raised for a *local* bug:
those stay ordinary exceptions, so a rejection always means "the remote side sent bad bytes".
"""

from __future__ import annotations

import enum


class RejectReason(enum.Enum):
    """Why a message was refused. Values are stable strings used in metrics and vectors."""

    OVERSIZE = "oversize"  # more bytes than the configured limit, checked before decoding
    MALFORMED = "malformed"  # not decodable msgpack, or not a map at the top level
    SCHEMA = "schema"  # missing or extra fields, wrong types, lengths out of bounds
    UNKNOWN_VERSION = "unknown_version"  # protocol version this peer does not speak
    UNKNOWN_KIND = "unknown_kind"  # message kind this peer does not know
    WRONG_RUN = "wrong_run"  # addressed to another swarm/run id
    BAD_SIGNATURE = "bad_signature"  # Ed25519 signature does not verify
    REPLAY = "replay"  # (sender, seq) already seen inside the replay window
    CLOCK_SKEW = "clock_skew"  # timestamp too far from the receiver's clock
    NON_FINITE = "non_finite"  # NaN or Inf in a float field or tensor
    SHAPE_MISMATCH = "shape_mismatch"  # counts/lengths/shapes disagree with what was announced
    UNKNOWN_CODEC = "unknown_codec"  # codec id not in the registry
    BAD_INDEX = "bad_index"  # sparse index out of bounds, unsorted or duplicated
    STALE_ROUND = "stale_round"  # gossip update for a round too far behind the receiver
    UNKNOWN_SENDER = "unknown_sender"  # sender not announced (where announcement is required)


class Reject(Exception):
    """A message was refused; ``reason`` says which rule it broke, the text says how."""

    reason: RejectReason = RejectReason.MALFORMED

    def __init__(self, detail: str) -> None:
        super().__init__(f"{self.reason.value}: {detail}")
        self.detail = detail


class Oversize(Reject):
    reason = RejectReason.OVERSIZE


class Malformed(Reject):
    reason = RejectReason.MALFORMED


class SchemaViolation(Reject):
    reason = RejectReason.SCHEMA


class UnknownVersion(Reject):
    reason = RejectReason.UNKNOWN_VERSION


class UnknownKind(Reject):
    reason = RejectReason.UNKNOWN_KIND


class WrongRun(Reject):
    reason = RejectReason.WRONG_RUN


class BadSignature(Reject):
    reason = RejectReason.BAD_SIGNATURE


class Replay(Reject):
    reason = RejectReason.REPLAY


class ClockSkew(Reject):
    reason = RejectReason.CLOCK_SKEW


class NonFinite(Reject):
    reason = RejectReason.NON_FINITE


class ShapeMismatch(Reject):
    reason = RejectReason.SHAPE_MISMATCH


class UnknownCodec(Reject):
    reason = RejectReason.UNKNOWN_CODEC


class BadIndex(Reject):
    reason = RejectReason.BAD_INDEX


class StaleRound(Reject):
    reason = RejectReason.STALE_ROUND


class UnknownSender(Reject):
    reason = RejectReason.UNKNOWN_SENDER


REJECT_TYPES: dict[RejectReason, type[Reject]] = {
    cls.reason: cls for cls in Reject.__subclasses__()
}
