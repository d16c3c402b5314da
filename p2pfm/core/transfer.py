"""State transfer and the consensus pull, both sides, as pure functions with typed refusals.

A joiner (or a peer too far behind) downloads a donor's whole *state*: the donor answers a
``state_request`` with a signed ``state_manifest`` (round, hash of the state, size, chunk
size, one hash per chunk), then the chunks as raw frames. A periodic sync pulls only the
donor's *parameters*: a signed ``params_sync`` answer that echoes the request's nonce.

Every rule here is tagged in ``protocols/wire.md`` (sections 6.1, 6.3 and 6.4)
and pinned by the vectors in ``protocols/vectors/transfer/``. The daemon moves the bytes;
nothing here reads a socket or a clock.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from p2pfm.core.envelope import Envelope
from p2pfm.core.errors import BadManifest, BadRound, BadState, HashMismatch, NotDonor, Oversize, WrongKind
from p2pfm.core.gossip import MAX_ROUND
from p2pfm.core.tensorfile import digest, pack_arrays, unpack_arrays

MAX_CHUNKS = 65536  # the manifest schema's bound on chunk_hashes


# --- which kind each stream takes --------------------------------------------------------
STREAM_KINDS = {"gossip": "update", "state": "state_request", "params": "state_request"}


def check_request_kind(stream: str, envelope: Envelope) -> None:
    """[REJECT] WRONG_KIND unless the message is the kind this stream takes (``STREAM_KINDS``).

    A state request must not be answerable with any signed message: the snapshot is served
    only to those who ask for it, and an update sent to the state stream is nobody's update.
    """
    expected = STREAM_KINDS[stream]
    if envelope.kind != expected:
        raise WrongKind(f"kind {envelope.kind!r} sent to the {stream} stream, which takes {expected}")


# --- the donor's side ---------------------------------------------------------------------
def pack_state(params: np.ndarray, round: int, optimizer: dict[str, np.ndarray]) -> bytes:
    """The snapshot a donor serves: parameters, round and the inner optimizer's state.

    Inner AdamW moments travel too: a joiner that restarted Adam from zero would take
    sign-sized first steps at full lr and wreck the model it just downloaded.
    """
    return pack_arrays(
        {"params": params, "round": np.array([round], dtype=np.int64), **optimizer},
        {"numel": int(params.size)},
    )


def manifest_payload(snapshot: bytes, round: int, chunk_size: int) -> tuple[dict, list[bytes]]:
    """The ``state_manifest`` payload for ``snapshot`` and the chunks to send after it."""
    chunks = [snapshot[i : i + chunk_size] for i in range(0, len(snapshot), chunk_size)]
    payload = {
        "round": round,
        "model_hash": digest(snapshot),
        "total_bytes": len(snapshot),
        "chunk_size": chunk_size,
        "chunk_hashes": [digest(c) for c in chunks],
    }
    return payload, chunks


# --- the joiner's side --------------------------------------------------------------------
@dataclass(frozen=True)
class Donor:
    """What the joiner knows of the peer it asks, from that peer's verified announcement."""

    public_key: bytes
    round: int
    model_hash: bytes


@dataclass(frozen=True)
class Manifest:
    """A checked manifest: what the chunks that follow must add up to."""

    round: int
    model_hash: bytes
    total_bytes: int
    chunk_size: int
    chunk_hashes: tuple[bytes, ...]

    def chunk_length(self, index: int) -> int:
        """The exact length chunk ``index`` must have: the reader's bound on its frame.

        ``chunk_size`` alone is no bound (nothing limits it but the schema's int > 0): a
        manifest of 100 bytes in one chunk of ``chunk_size`` 2^40 would let a donor send a
        frame far past ``max_state_bytes``. The expected length never exceeds ``total_bytes``.
        """
        return max(0, min(self.chunk_size, self.total_bytes - index * self.chunk_size))


def check_manifest(envelope: Envelope, donor: Donor, *, max_state_bytes: int) -> Manifest:
    """A donor's manifest, checked against the donor we asked and our limits.

    [REJECT] WRONG_KIND unless it is a ``state_manifest``; [REJECT] NOT_DONOR unless the
    donor's announced key signed it (no stranger's state); [REJECT] BAD_ROUND if its round
    exceeds ``MAX_ROUND``; [REJECT] BAD_MANIFEST if it
    matches neither the announced state hash nor a round at least as new as announced (the
    donor may have moved on since its announcement); [REJECT] OVERSIZE if ``total_bytes``
    exceeds our ``max_state_bytes``; [REJECT] BAD_MANIFEST if the number of chunk hashes is
    not ``ceil(total_bytes / chunk_size)``.
    """
    if envelope.kind != "state_manifest":
        raise WrongKind(f"kind {envelope.kind!r} where a state_manifest belongs")
    if envelope.sender != donor.public_key:
        raise NotDonor("state manifest not signed by the announced donor")
    m = envelope.payload
    if m["round"] > MAX_ROUND:
        raise BadRound(f"state manifest claims round {m['round']}, beyond any run (max {MAX_ROUND})")
    if m["model_hash"] != donor.model_hash and m["round"] < donor.round:
        raise BadManifest(
            f"state manifest of round {m['round']} matches neither the announced hash nor a round >= {donor.round}"
        )
    if m["total_bytes"] > max_state_bytes:
        raise Oversize(f"state of {m['total_bytes']} bytes exceeds max_state_bytes ({max_state_bytes})")
    expected_chunks = -(-m["total_bytes"] // m["chunk_size"])
    if expected_chunks != len(m["chunk_hashes"]):
        raise BadManifest(
            f"state manifest lists {len(m['chunk_hashes'])} chunk hashes for {m['total_bytes']} bytes "
            f"in chunks of {m['chunk_size']} (expected {expected_chunks})"
        )
    return Manifest(
        round=m["round"], model_hash=m["model_hash"], total_bytes=m["total_bytes"],
        chunk_size=m["chunk_size"], chunk_hashes=tuple(m["chunk_hashes"]),
    )  # fmt: skip


def check_chunk(manifest: Manifest, index: int, piece: bytes) -> None:
    """[REJECT] HASH_MISMATCH unless chunk ``index`` hashes to the manifest's entry.

    The reader bounds each frame by :meth:`Manifest.chunk_length` before reading it
    (OVERSIZE), so a lying donor costs at most one chunk of memory before it is caught.
    """
    if digest(piece) != manifest.chunk_hashes[index]:
        raise HashMismatch(f"state chunk {index} does not match its hash")


def check_state(
    manifest: Manifest, pieces: list[bytes], *, numel: int, max_state_bytes: int
) -> tuple[dict[str, np.ndarray], int]:
    """The assembled state, checked: its hash, then its contents.

    [REJECT] HASH_MISMATCH unless the chunks add up to ``total_bytes`` and hash to
    ``model_hash``; the container's own checks (``tensorfile``: MALFORMED, SCHEMA, OVERSIZE,
    SHAPE_MISMATCH); [REJECT] BAD_STATE unless it holds float32 ``params`` of our model's size
    and an int64 ``round`` of one element equal to the manifest's round.
    """
    blob = b"".join(pieces)
    if len(blob) != manifest.total_bytes or digest(blob) != manifest.model_hash:
        raise HashMismatch("downloaded state does not match the manifest hash")
    arrays, _ = unpack_arrays(blob, max_bytes=max_state_bytes)
    params = arrays.get("params")
    if params is None or params.dtype != np.float32 or params.shape != (numel,):
        raise BadState(f"donor state has no float32 params of our model's size ({numel})")
    round_ = arrays.get("round")
    if round_ is None or round_.shape != (1,) or round_.dtype != np.int64:
        raise BadState("donor state has no round counter")
    if int(round_[0]) != manifest.round:
        raise BadState(f"donor state is of round {int(round_[0])}, its manifest says {manifest.round}")
    if not np.isfinite(params).all():
        raise BadState("donor state's params contain NaN or Inf")
    return arrays, int(round_[0])


def check_params_answer(envelope: Envelope, donor_key: bytes, nonce: bytes) -> None:
    """[REJECT] WRONG_KIND unless a ``params_sync``; [REJECT] NOT_DONOR unless signed by the
    peer we asked and echoing our request's nonce (an answer to another ask, or a replayed
    one, is refused); [REJECT] BAD_ROUND if its round exceeds ``MAX_ROUND``. The tensor is
    checked by the codec when decoded."""
    if envelope.kind != "params_sync":
        raise WrongKind(f"kind {envelope.kind!r} where a params_sync answer belongs")
    if envelope.sender != donor_key:
        raise NotDonor("params answer not signed by the donor we asked")
    if envelope.payload["nonce"] != nonce:
        raise NotDonor("params answer echoes another request's nonce")
    if envelope.payload["round"] > MAX_ROUND:
        raise BadRound(
            f"params answer claims round {envelope.payload['round']}, beyond any run (max {MAX_ROUND})"
        )
