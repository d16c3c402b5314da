"""Typed refusals for everything that arrives from the wire: *reject* or *ignore*.

Two kinds, because they call for different policy (``p2pfm.core.scoring``):

- :class:`Reject` (with a :class:`RejectReason`): the sender broke a rule no honest peer
  breaks (bad signature, malformed bytes, a state download that does not match its
  manifest). Counted by reason, and it lowers the sender's score; enough of them ban it.
- :class:`Ignore` (with an :class:`IgnoreReason`): the message is authentic and well formed
  but of no use to us now (an honest laggard's stale round, a sender already banned).
  Counted by reason, never held against the sender.

Both derive from :class:`Refusal`, which is what a handler catches. Nothing here is ever
raised for a *local* bug: those stay ordinary exceptions, so a refusal always means "the
remote side sent something we will not use".
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
    WRONG_KIND = "wrong_kind"  # a valid message of a kind this stream or record does not take
    NOT_DONOR = "not_donor"  # an answer not signed by the peer we asked, or not for our ask
    BAD_MANIFEST = "bad_manifest"  # a state manifest that contradicts itself or the announcement
    HASH_MISMATCH = "hash_mismatch"  # state bytes that do not match the manifest's hashes
    BAD_STATE = "bad_state"  # a verified state download that is not a state of our model
    SUBKEY_MISMATCH = "subkey_mismatch"  # a DHT record stored under another peer's subkey
    BAD_UPDATE = "bad_update"  # an update whose metadata no honest peer sends
    BAD_ROUND = "bad_round"  # a round beyond MAX_ROUND: no run gets there, and int64 arithmetic would
    NOT_ADMITTED = "not_admitted"  # no valid, unexpired, unrevoked certificate of the swarm's authority


class IgnoreReason(enum.Enum):
    """Why an authentic message was not used. Values are stable strings used in metrics."""

    STALE_ROUND = "stale_round"  # gossip update for a round too far behind the receiver
    FUTURE_ROUND = "future_round"  # gossip update claiming a round far ahead (we lag, or it lies)
    BANNED = "banned"  # the sender's earlier rejections banned it; read no further
    UNKNOWN_SENDER = "unknown_sender"  # authentic, but not from a peer we know announced (and admitted)
    RATE_LIMITED = "rate_limited"  # the sender (or everyone together) is over its message or byte budget
    ROUND_FULL = "round_full"  # this round already counts its sender's update, or its cap of updates


class Refusal(Exception):
    """A message was not used; ``reason`` says which rule, the text says how."""

    reason: RejectReason | IgnoreReason

    def __init__(self, detail: str) -> None:
        super().__init__(f"{self.reason.value}: {detail}")
        self.detail = detail

    @property
    def lowers_score(self) -> bool:
        """Only rejections count against a sender; ignoring is no verdict on its honesty."""
        return isinstance(self, Reject)


class Reject(Refusal):
    """A message broke a rule; ``reason`` says which rule it broke, the text says how."""

    reason: RejectReason = RejectReason.MALFORMED


class Ignore(Refusal):
    """An authentic message we do not use, with no penalty for its sender."""

    reason: IgnoreReason = IgnoreReason.STALE_ROUND


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


class WrongKind(Reject):
    reason = RejectReason.WRONG_KIND


class NotDonor(Reject):
    reason = RejectReason.NOT_DONOR


class BadManifest(Reject):
    reason = RejectReason.BAD_MANIFEST


class HashMismatch(Reject):
    reason = RejectReason.HASH_MISMATCH


class BadState(Reject):
    reason = RejectReason.BAD_STATE


class SubkeyMismatch(Reject):
    reason = RejectReason.SUBKEY_MISMATCH


class BadUpdate(Reject):
    reason = RejectReason.BAD_UPDATE


class BadRound(Reject):
    reason = RejectReason.BAD_ROUND


class NotAdmitted(Reject):
    reason = RejectReason.NOT_ADMITTED


class StaleRound(Ignore):
    reason = IgnoreReason.STALE_ROUND


class FutureRound(Ignore):
    reason = IgnoreReason.FUTURE_ROUND


class Banned(Ignore):
    reason = IgnoreReason.BANNED


class UnknownSender(Ignore):
    reason = IgnoreReason.UNKNOWN_SENDER


class RateLimited(Ignore):
    reason = IgnoreReason.RATE_LIMITED


class RoundFull(Ignore):
    reason = IgnoreReason.ROUND_FULL


REJECT_TYPES: dict[RejectReason, type[Reject]] = {cls.reason: cls for cls in Reject.__subclasses__()}
IGNORE_TYPES: dict[IgnoreReason, type[Ignore]] = {cls.reason: cls for cls in Ignore.__subclasses__()}
