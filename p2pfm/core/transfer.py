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

import hashlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from p2pfm.core.envelope import Envelope
from p2pfm.core.errors import (
    BadIndex,
    BadManifest,
    BadRound,
    BadState,
    HashMismatch,
    NotDonor,
    Oversize,
    WrongKind,
)
from p2pfm.core.gossip import MAX_ROUND
from p2pfm.core.lane import LaneOffer
from p2pfm.core.tensorfile import Buffer, LazyArray, digest, pack_arrays, unpack_arrays, write_arrays

MAX_CHUNKS = 65536  # the manifest schema's bound on chunk_hashes
MAX_CHUNK_BYTES = 64 << 20  # a donor's chunk_size beyond this is refused: each chunk is one frame in RAM
MAX_WANT_RANGES = 256  # the state_request schema's bound on want.ranges: ~3 KB of request at most
FINITE_PIECE_BYTES = 8 << 20  # the params' NaN/Inf check reads them in pieces of this size


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


@dataclass(frozen=True)
class StateLayout:
    """A packed state as a manifest describes it: its hash, size, and the hash of every chunk."""

    model_hash: bytes
    total_bytes: int
    chunk_size: int
    chunk_hashes: tuple[bytes, ...]

    def chunk_range(self, index: int) -> tuple[int, int]:
        """(offset, length) of chunk ``index`` in the state."""
        start = index * self.chunk_size
        return start, max(0, min(self.chunk_size, self.total_bytes - start))


STATE_ROOT_DOMAIN = b"p2pfm/state-root/v1\x00"


def state_root(total_bytes: int, chunk_size: int, chunk_hashes: Sequence[bytes]) -> bytes:
    """A state's ``model_hash``: SHA-256 over its size, chunk size and chunk hashes (a hash list's
    root), not over its bytes.

    Why: the chunk hashes already pin every byte, so a hash of the bytes themselves was a second
    SHA-256 pass over 1.5 GB at 124M parameters, once a round on every peer (the served snapshot)
    and once more on a joiner. The root binds the manifest's hashes to the announced state, so a
    manifest whose chunk hashes are not those of the state it names is refused before any chunk
    is read (``check_manifest``), not after the whole download.
    """
    root = hashlib.sha256(STATE_ROOT_DOMAIN)
    root.update(total_bytes.to_bytes(8, "big"))
    root.update(chunk_size.to_bytes(8, "big"))
    for chunk_hash in chunk_hashes:
        root.update(chunk_hash)
    return root.digest()


class ChunkHasher:
    """Hashes a byte stream as it is written, every ``chunk_size`` piece (``chunk_hashes``; the
    state's ``model_hash`` is their :func:`state_root`), so a snapshot streamed to a file is
    never read back to be hashed."""

    def __init__(self, chunk_size: int) -> None:
        if chunk_size <= 0:
            raise ValueError("chunk_size must be positive")
        self.chunk_size = chunk_size
        self.chunk = hashlib.sha256()
        self.in_chunk = 0
        self.total = 0
        self.hashes: list[bytes] = []

    def update(self, data: Buffer) -> None:
        view = memoryview(data).cast("B")
        self.total += len(view)
        while len(view):
            take = min(len(view), self.chunk_size - self.in_chunk)
            self.chunk.update(view[:take])
            self.in_chunk += take
            view = view[take:]
            if self.in_chunk == self.chunk_size:
                self.hashes.append(self.chunk.digest())
                self.chunk, self.in_chunk = hashlib.sha256(), 0

    def layout(self) -> StateLayout:
        hashes = (*self.hashes, self.chunk.digest()) if self.in_chunk else tuple(self.hashes)
        return StateLayout(
            state_root(self.total, self.chunk_size, hashes), self.total, self.chunk_size, hashes
        )


def state_hash(state: Buffer, chunk_size: int) -> bytes:
    """The ``model_hash`` of ``state`` served in chunks of ``chunk_size`` (:func:`state_root`)."""
    hasher = ChunkHasher(chunk_size)
    hasher.update(state)
    return hasher.layout().model_hash


def write_state(
    write: Callable[[memoryview], object],
    params: np.ndarray,
    round: int,
    optimizer: Mapping[str, np.ndarray | LazyArray],
    chunk_size: int,
) -> StateLayout:
    """Stream :func:`pack_state`'s bytes into ``write`` (a file's), hashing as it goes.

    The same bytes as ``pack_state`` (same hash, same manifest), without ever holding them.
    """
    hasher = ChunkHasher(chunk_size)

    def sink(piece: memoryview) -> None:
        hasher.update(piece)
        write(piece)

    write_arrays(
        sink,
        {"params": params, "round": np.array([round], dtype=np.int64), **optimizer},
        {"numel": int(params.size)},
    )
    return hasher.layout()


def layout_payload(layout: StateLayout, round: int) -> dict:
    """The ``state_manifest`` payload of a state laid out as ``layout``."""
    return {
        "round": round,
        "model_hash": layout.model_hash,
        "total_bytes": layout.total_bytes,
        "chunk_size": layout.chunk_size,
        "chunk_hashes": list(layout.chunk_hashes),
    }


def manifest_payload(snapshot: bytes, round: int, chunk_size: int) -> tuple[dict, list[bytes]]:
    """The ``state_manifest`` payload for ``snapshot`` and the chunks to send after it."""
    chunks = [snapshot[i : i + chunk_size] for i in range(0, len(snapshot), chunk_size)]
    hasher = ChunkHasher(chunk_size)
    hasher.update(snapshot)
    return layout_payload(hasher.layout(), round), chunks


def wanted_chunks(want: Mapping | None, layout: StateLayout) -> list[int]:
    """The chunk indexes a ``state_request``'s optional ``want`` asks of the state ``layout``.

    No ``want``, or a ``want`` about another state (its ``model_hash`` is not ours): every chunk.
    Otherwise the union of its ``ranges`` [start, stop), which must be pairs with
    0 <= start < stop <= the number of chunks, ascending and not overlapping: [REJECT] BAD_INDEX
    otherwise. The schema bounds the list (``MAX_WANT_RANGES``), so this costs at most
    ``MAX_CHUNKS`` indexes whatever the asker sends.
    """
    count = len(layout.chunk_hashes)
    if want is None or want["model_hash"] != layout.model_hash:
        return list(range(count))
    indexes: list[int] = []
    end = 0
    for position, pair in enumerate(want["ranges"]):
        if len(pair) != 2:
            raise BadIndex(f"want range {position} is not a [start, stop) pair")
        start, stop = pair
        if not end <= start < stop <= count:
            raise BadIndex(
                f"want range {position} [{start}, {stop}) is empty, out of order, overlapping or beyond "
                f"the {count} chunks"
            )
        indexes.extend(range(start, stop))
        end = stop
    return indexes


def want_ranges(indexes: Iterable[int], max_ranges: int = MAX_WANT_RANGES) -> list[list[int]]:
    """Ascending ``indexes`` as at most ``max_ranges`` [start, stop) pairs: runs, then the smallest
    gaps closed until they fit (asking again for a few chunks we hold costs bytes, not safety)."""
    runs: list[list[int]] = []
    for index in indexes:
        if runs and index == runs[-1][1]:
            runs[-1][1] = index + 1
        else:
            runs.append([index, index + 1])
    while len(runs) > max_ranges:
        gap = min(range(len(runs) - 1), key=lambda i: runs[i + 1][0] - runs[i][1])
        runs[gap : gap + 2] = [[runs[gap][0], runs[gap + 1][1]]]
    return runs


def reusable(manifest_hashes: Sequence[bytes], held: Mapping[bytes, object]) -> list[int]:
    """Indexes of the chunks a manifest lists that we already hold *verified* (by content hash,
    at any index of any earlier manifest): these need not be downloaded again."""
    return [index for index, chunk_hash in enumerate(manifest_hashes) if chunk_hash in held]


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
    # The donor's lane offer (p2pfm.core.lane), if any: how this transfer's chunks may travel, not
    # what they are, so two manifests of one state are equal whatever they offer (resume keys on it).
    lane: LaneOffer | None = field(default=None, compare=False, repr=False)

    @property
    def layout(self) -> StateLayout:
        return StateLayout(self.model_hash, self.total_bytes, self.chunk_size, self.chunk_hashes)

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
    exceeds our ``max_state_bytes``; [REJECT] OVERSIZE if ``chunk_size`` exceeds
    ``MAX_CHUNK_BYTES`` (a chunk is one frame in memory: a 2 GB "chunk" would be the whole state
    at once); [REJECT] BAD_MANIFEST if the number of chunk hashes is not
    ``ceil(total_bytes / chunk_size)``.
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
    if m["chunk_size"] > MAX_CHUNK_BYTES:
        raise Oversize(f"chunk size {m['chunk_size']} exceeds {MAX_CHUNK_BYTES}: each chunk is read whole")
    expected_chunks = -(-m["total_bytes"] // m["chunk_size"])
    if expected_chunks != len(m["chunk_hashes"]):
        raise BadManifest(
            f"state manifest lists {len(m['chunk_hashes'])} chunk hashes for {m['total_bytes']} bytes "
            f"in chunks of {m['chunk_size']} (expected {expected_chunks})"
        )
    if state_root(m["total_bytes"], m["chunk_size"], m["chunk_hashes"]) != m["model_hash"]:
        raise BadManifest("state manifest's model_hash is not the root of its chunk hashes")
    offer = m.get("lane")
    return Manifest(
        round=m["round"], model_hash=m["model_hash"], total_bytes=m["total_bytes"],
        chunk_size=m["chunk_size"], chunk_hashes=tuple(m["chunk_hashes"]),
        lane=None if offer is None else LaneOffer(port=offer["port"], secret=offer["secret"]),
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
    """The assembled state, checked: its hashes, then its contents.

    [REJECT] HASH_MISMATCH unless the chunks add up to ``total_bytes``, ``model_hash`` is the
    root of the chunk hashes (:func:`state_root`) and every chunk matches its hash; the
    container's own checks (``tensorfile``: MALFORMED, SCHEMA, OVERSIZE, SHAPE_MISMATCH);
    [REJECT] BAD_STATE unless it holds float32 ``params`` of our model's size and an int64
    ``round`` of one element equal to the manifest's round.
    """
    return check_state_buffer(manifest, b"".join(pieces), numel=numel, max_state_bytes=max_state_bytes)


def check_state_buffer(
    manifest: Manifest,
    blob: Buffer,
    *,
    numel: int,
    max_state_bytes: int,
    copy: bool = True,
    chunks_checked: bool = False,
) -> tuple[dict[str, np.ndarray], int]:
    """:func:`check_state` of a state already assembled in one buffer (an ``mmap`` of the
    downloaded file: unpacked without copying when ``copy`` is false). The same rules in the
    same order.

    ``chunks_checked``: the caller checked every chunk of exactly these bytes against this
    manifest as it wrote them (the joiner checks each chunk on arrival, and each kept one again
    as it moves): no second pass over the buffer. The root rule holds all the same."""
    view = memoryview(blob).cast("B")
    if len(view) != manifest.total_bytes:
        raise HashMismatch(f"downloaded state has {len(view)} bytes, its manifest {manifest.total_bytes}")
    if state_root(manifest.total_bytes, manifest.chunk_size, manifest.chunk_hashes) != manifest.model_hash:
        raise HashMismatch("downloaded state's chunk hashes do not add up to the manifest hash")
    if not chunks_checked:
        for index, chunk_hash in enumerate(manifest.chunk_hashes):
            start = index * manifest.chunk_size
            if digest(view[start : start + manifest.chunk_length(index)]) != chunk_hash:
                raise HashMismatch(f"state chunk {index} does not match its hash")
    arrays, _ = unpack_arrays(blob, max_bytes=max_state_bytes, copy=copy)
    params = arrays.get("params")
    if params is None or params.dtype != np.float32 or params.shape != (numel,):
        raise BadState(f"donor state has no float32 params of our model's size ({numel})")
    round_ = arrays.get("round")
    if round_ is None or round_.shape != (1,) or round_.dtype != np.int64:
        raise BadState("donor state has no round counter")
    if int(round_[0]) != manifest.round:
        raise BadState(f"donor state is of round {int(round_[0])}, its manifest says {manifest.round}")
    step = FINITE_PIECE_BYTES // 4  # bounded temporaries: isfinite of 124M floats at once is 124 MB
    if not all(np.isfinite(params[i : i + step]).all() for i in range(0, params.size, step)):
        raise BadState("donor state's params contain NaN or Inf")
    return arrays, int(round_[0])


def params_answer_limit(numel: int, max_message_bytes: int) -> int:
    """The largest ``params_sync`` answer we read: a dense float32 copy of our model plus 1 MiB.

    The gossip limit (``max_message_bytes``, 64 MiB) fits a 1M model's answer many times but not
    a 124M model's (its int8 sync is ~126 MB), so every consensus pull and state confirmation
    failed at that size. A donor still cannot make us read more than our own model's size in
    float32, which no honest codec exceeds.
    """
    return max(max_message_bytes, 4 * numel + (1 << 20))


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
