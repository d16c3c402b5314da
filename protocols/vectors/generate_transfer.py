"""Regenerate the golden vectors in ``protocols/vectors/transfer/``: the receiving rules beyond
the envelope (``protocols/wire.md`` section 6).

    python protocols/vectors/generate_transfer.py [OUT_DIR]   # default: this folder

Writes one folder per case under ``OUT_DIR/transfer/`` (files described in :data:`README`)
for eight groups: ``stream`` (which kind each stream takes), ``update`` (receiving a gossip
update: ban, envelope, kind, metadata, round window, codec), ``manifest``, ``chunk`` and
``state`` (state transfer), ``want`` (which chunks a donor sends), ``params`` (the consensus pull's answer) and ``announce`` (DHT
records). :func:`run_case` is the executable form of the README's "how to run a case": it
drives a :class:`~p2pfm.core.protocol.PeerProtocol` (or
:func:`~p2pfm.core.announce.check_announcement`) the way the daemon does.

Timestamps, sequence numbers and nonces are fixed and Ed25519 signatures are deterministic
(RFC 8032), so running it twice gives identical files; ``tests/test_transfer_vectors.py``
checks that, and checks every case against the code.

Keys are TEST-ONLY, with public seeds: messages are signed by ``test_key.pem`` (the
envelope vectors' key), "stranger" cases by a second key whose seed is
SHA-256(b"p2pfm TEST-ONLY vector key v1 (other)") (the envelope vectors' other key). They
prove nothing about anybody; never use them for a real peer.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import numpy as np

from p2pfm.core.announce import Announcement, announcement_limits, check_announcement
from p2pfm.core.codecs import CodecSpec, encode
from p2pfm.core.envelope import PROTOCOL_VERSION, EnvelopeLimits, pack_body, pack_wire, seal, signing_bytes
from p2pfm.core.errors import IgnoreReason, Refusal, RejectReason
from p2pfm.core.gossip import GossipConfig, encode_sync
from p2pfm.core.identity import Identity
from p2pfm.core.protocol import LocalWork, PeerProtocol, PeerSetup, anchor_hash, update_payload
from p2pfm.core.tensorfile import MAGIC, digest, pack_arrays
from p2pfm.core.transfer import (
    MAX_CHUNK_BYTES,
    MAX_WANT_RANGES,
    Donor,
    Manifest,
    manifest_payload,
    pack_state,
    wanted_chunks,
)

VECTORS_DIR = Path(__file__).resolve().parent
TEST_KEY_SEED = hashlib.sha256(b"p2pfm TEST-ONLY vector key v1").digest()  # test_key.pem
STRANGER_KEY_SEED = hashlib.sha256(b"p2pfm TEST-ONLY vector key v1 (other)").digest()
RECEIVER_KEY_SEED = hashlib.sha256(b"p2pfm TEST-ONLY vector key v1 (receiver)").digest()  # signs nothing here
RUN = "vector-run"
NOW = 1_700_000_000.0
TS = NOW + 0.25
NUMEL = 8
CHUNK = 64  # small chunks, so the state below spans several (the last one shorter)
STATE_ROUND = 7
RECEIVER_ROUND = 20
LAG = 8  # GossipConfig.max_round_lag's default
NONCE = bytes(range(16))
OTHER_NONCE = bytes(range(16, 32))
REMOTE = "12D3KooWVectorRemotePeerVectorRemotePeerVectorRe"  # the transport's name for the sender
TTL_S = 15.0  # the daemon's announce_ttl_s default

README = """\
# Transfer, params-sync, announcement and update vectors

Golden cases for `protocols/wire.md` section 6 (the rules after the envelope's). Each folder
is one case; its name starts with its group, and `context.json` says the group:

| group | input file | what runs |
| --- | --- | --- |
| `stream` | `envelope.hex` | `PeerProtocol.open(data, now, stream=context.stream)` |
| `update` | `envelope.hex` | `PeerProtocol.receive_update(context.remote, data, now)` |
| `manifest` | `envelope.hex` | `PeerProtocol.open_manifest(data, Donor(**context.donor), now)` |
| `chunk` | `chunk.hex` | `check_chunk(Manifest(**context.manifest), context.index, piece)` |
| `state` | `chunks.hex` (one chunk per line) | `PeerProtocol.open_state(Manifest(**context.manifest), pieces)` |
| `want` | `envelope.hex` (a `state_request`) | `wanted_chunks(PeerProtocol.open(data, now, stream="state").payload.get("want"), Manifest(**context.manifest).layout)`: the chunk indexes the donor sends |
| `params` | `envelope.hex` | `PeerProtocol.open_params(data, context.donor_key, context.nonce, now)` |
| `announce` | `record.hex` (bytes) or `record.json` (any other value) | `check_announcement(context.subkey, record, run_id=..., now=..., limits=announcement_limits(EnvelopeLimits(**context.limits), context.ttl_s))` |

`context.json` holds the receiver's state: `group`, `run_id`, `now` (unix seconds), and as
the group needs: `receiver_round`, `max_round_lag` (a `GossipConfig` field), `numel` (the
model's size; the receiver's initial parameters are zeros) or `initial` (its initial
parameters, float32 as JSON numbers), `max_state_bytes`, `remote` and `banned` (that
transport is banned: `Scoreboard.ban`), `replay_seen` (`[{sender, seq,
timestamp}]` recorded in the receiver's replay guard first), `donor`, `manifest`, `index`,
`donor_key`, `nonce`, `subkey`, `ttl_s`, `limits` (fields of `EnvelopeLimits`). Bytes are
lowercase hex. `generate_transfer.run_case` builds the receiver from it.

`expected.json`: `{"outcome": "accept", "result": {...}}` (what the call returned, bytes as
hex, floats exact), or `{"outcome": "reject" | "ignore", "reason": "<RejectReason or
IgnoreReason value>"}`: a reject lowers a score (the transport's for envelope rules, the
signing key's for the rules after them; 50 ban it), an ignore never does. `description` says what the case exercises; where it says "order", the input breaks
two rules and the reason is that of the rule applied first.

Messages are signed by `../test_key.pem`; "stranger" cases by a second key, seed
SHA-256(b"p2pfm TEST-ONLY vector key v1 (other)"). Both are TEST-ONLY keys with public
seeds. Regenerate with `python protocols/vectors/generate_transfer.py` (byte-identical; a
test checks it and runs every case).
"""


def load_identity(seed: bytes) -> Identity:
    """A TEST-ONLY identity from a public seed (no key file, so no file-mode check)."""
    return Identity.from_private_bytes(seed)


DONOR = load_identity(TEST_KEY_SEED)
STRANGER = load_identity(STRANGER_KEY_SEED)


# --- JSON views ----------------------------------------------------------------------------


def hexify(value: Any) -> Any:
    """JSON-ready copy: bytes as hex, tuples as lists, numpy scalars as Python numbers."""
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, dict):
        return {k: hexify(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [hexify(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def array_view(array: np.ndarray) -> dict[str, Any]:
    """An array as JSON: dtype code, shape and the values (float32 and int64 are exact in JSON)."""
    return {"dtype": array.dtype.str, "shape": list(array.shape), "values": [v.item() for v in array.ravel()]}


def announcement_view(a: Announcement) -> dict[str, Any]:
    return {
        "peer_id": a.peer_id, "public_key": a.public_key.hex(), "libp2p_id": a.libp2p_id,
        "maddrs": list(a.maddrs), "round": a.round, "model_hash": a.model_hash.hex(), "device_class": a.device_class,
        "power_w": a.power_w, "state_bytes": a.state_bytes, "seq": a.seq, "timestamp": a.timestamp,
        "sees": list(a.sees), **({"paused": a.paused} if a.paused is not None else {}),
        # Energy claims appear only where announced (older vectors stay byte-identical).
        **{k: v for k in ENERGY_FIELDS if (v := getattr(a, k)) is not None},
    }  # fmt: skip


ENERGY_FIELDS = ("energy_wh", "marginal_wh", "tokens", "energy_source", "grid_g_per_kwh")


def manifest_view(m: Manifest) -> dict[str, Any]:
    return {
        "round": m.round, "model_hash": m.model_hash.hex(), "total_bytes": m.total_bytes,
        "chunk_size": m.chunk_size, "chunk_hashes": [h.hex() for h in m.chunk_hashes],
    }  # fmt: skip


def manifest_from(view: dict[str, Any]) -> Manifest:
    return Manifest(
        round=view["round"], model_hash=bytes.fromhex(view["model_hash"]), total_bytes=view["total_bytes"],
        chunk_size=view["chunk_size"], chunk_hashes=tuple(bytes.fromhex(h) for h in view["chunk_hashes"]),
    )  # fmt: skip


# --- running a case ------------------------------------------------------------------------


def receiver(context: dict[str, Any]) -> PeerProtocol:
    """The receiving peer a case's context describes."""
    if "initial" in context:
        initial = np.array(context["initial"], dtype=np.float32)
    else:
        initial = np.zeros(context.get("numel", NUMEL), dtype=np.float32)
    setup = PeerSetup(
        identity=load_identity(RECEIVER_KEY_SEED), run_id=context["run_id"],
        gossip=GossipConfig(max_round_lag=context.get("max_round_lag", LAG)),
        limits=EnvelopeLimits(**context.get("limits", {})), max_state_bytes=context.get("max_state_bytes", 1 << 30),
    )  # fmt: skip
    peer = PeerProtocol(setup, initial, round=context.get("receiver_round", 0))
    for seen in context.get("replay_seen", []):
        peer.replay_guard.check_and_record(
            bytes.fromhex(seen["sender"]), seen["seq"], seen["timestamp"], context["now"]
        )
    if context.get("banned"):
        peer.scores.ban(context["remote"], context["now"])
    return peer


def read_input(folder: Path, group: str) -> Any:
    """The case's input: bytes, a list of chunks (``state``), or a JSON value (``record.json``)."""
    if group == "chunk":
        return bytes.fromhex((folder / "chunk.hex").read_text().strip())
    if group == "state":
        return [bytes.fromhex(line) for line in (folder / "chunks.hex").read_text().split()]
    if group == "announce" and (folder / "record.json").exists():
        return json.loads((folder / "record.json").read_text())
    name = "record.hex" if group == "announce" else "envelope.hex"
    return bytes.fromhex((folder / name).read_text().strip())


def run_case(context: dict[str, Any], data: Any, peer: PeerProtocol | None = None) -> dict[str, Any]:
    """Run one case as the README says; return the accept result (raises the Refusal otherwise).

    ``peer``: the receiver to use (default: a fresh :func:`receiver` of ``context``), so a
    caller can look at its scores afterwards.
    """
    group, now = context["group"], context["now"]
    peer = receiver(context) if peer is None else peer
    if group == "stream":
        env = peer.open(data, now, stream=context["stream"])
        return {"kind": env.kind, "sender_id": env.sender_id, "round": env.round, "seq": env.seq}
    if group == "update":
        env = peer.receive_update(context["remote"], data, now)
        p = env.payload
        return {
            "sender_id": env.sender_id,
            "round": env.round,
            "weight": p["weight"],
            "inner_steps": p["inner_steps"],
        }
    if group == "manifest":
        donor = Donor(**{k: v if k == "round" else bytes.fromhex(v) for k, v in context["donor"].items()})
        return manifest_view(peer.open_manifest(data, donor, now))
    if group == "chunk":
        peer.check_chunk(manifest_from(context["manifest"]), context["index"], data)
        return {}
    if group == "state":
        arrays, round_ = peer.open_state(manifest_from(context["manifest"]), data)
        return {"round": round_, "arrays": {name: array_view(a) for name, a in arrays.items()}}
    if group == "want":
        env = peer.open(data, now, stream="state")
        return {"indexes": wanted_chunks(env.payload.get("want"), manifest_from(context["manifest"]).layout)}
    if group == "params":
        donor_key, nonce = bytes.fromhex(context["donor_key"]), bytes.fromhex(context["nonce"])
        params, round_ = peer.open_params(data, donor_key, nonce, now)
        return {"round": round_, "params": array_view(params)}
    if group == "announce":
        limits = announcement_limits(EnvelopeLimits(**context.get("limits", {})), context["ttl_s"])
        announcement = check_announcement(
            context["subkey"], data, run_id=context["run_id"], now=now, limits=limits
        )
        return announcement_view(announcement)
    raise ValueError(f"unknown group {group!r}")


# --- building blocks -----------------------------------------------------------------------


def sealed(
    kind: str,
    payload: dict[str, Any],
    *,
    signer: Identity = DONOR,
    round: int = STATE_ROUND,
    seq: int = 1,
    ts: float = TS,
) -> bytes:
    """A message signed by ``signer`` (the test key unless a stranger's case)."""
    return seal(signer, kind=kind, run_id=RUN, round=round, seq=seq, timestamp=ts, payload=payload)


def sealed_unchecked(kind: str, payload: dict[str, Any], *, round: int = 3, seq: int = 1) -> bytes:
    """Signed like :func:`sealed` but without ``seal``'s own schema check: what a hostile peer sends."""
    body = pack_body({
        "v": PROTOCOL_VERSION, "kind": kind, "run": RUN, "sender": DONOR.public_key_bytes,
        "round": round, "seq": seq, "ts": TS, "payload": payload,
    })  # fmt: skip
    return pack_wire(body, DONOR.sign(signing_bytes(kind, RUN, body)))


def flip_last(data: bytes) -> bytes:
    """The last byte xor 1: in a message, a signature that no longer verifies."""
    return data[:-1] + bytes([data[-1] ^ 1])


REQUEST = {"round": 3, "nonce": NONCE}

# The donor's state: parameters, round and inner-optimizer moments (what pack_state serves).
PARAMS = np.array([0.5, -1.25, 2.0, 0.0, 3.5, -0.75, 0.125, -4.0], dtype=np.float32)
OPTIMIZER = {
    "opt.0.exp_avg": np.full(NUMEL, 0.125, dtype=np.float32),
    "opt.0.exp_avg_sq": np.full(NUMEL, 0.015625, dtype=np.float32),
}
STATE = pack_state(PARAMS, STATE_ROUND, OPTIMIZER)
MANIFEST, CHUNKS = manifest_payload(STATE, STATE_ROUND, CHUNK)
NEWER_STATE = pack_state(PARAMS + 1.0, STATE_ROUND + 2, OPTIMIZER)

ANNOUNCE = {
    "libp2p_id": "12D3KooWVectorDonorVectorDonorVectorDonorVectorDo",
    "maddrs": ["/ip4/127.0.0.1/tcp/31337"],
    "round": STATE_ROUND,
    "model_hash": MANIFEST["model_hash"],  # the root of its chunk hashes (transfer.state_root)
    "device_class": "raspberry-pi-4",
    "power_w": 6.4,
    "state_bytes": len(STATE),
    "sees": ["12D3KooWVectorRemotePeerVectorRemotePeerVectorRe"],
}
ENERGY = {  # a Pi that trained 1.2 M bytes for 1.5 Wh on a world-average grid (optional fields)
    "energy_wh": 1.5, "marginal_wh": 0.75, "tokens": 1_200_000, "energy_source": "modelled:profile",
    "grid_g_per_kwh": 475.0,
}  # fmt: skip

# The update: the one builder (update_payload) over a real codec map of a delta.
DELTA = np.array([0.5, -0.25, 0.125, 2.0, 0.0, 0.0, -1.0, 0.75], dtype=np.float32)
ANCHOR = anchor_hash(np.zeros(NUMEL, dtype=np.float32))


def update(
    round: int = RECEIVER_ROUND, inner_steps: int = 10, tensor: dict | None = None, signer: Identity = DONOR
) -> bytes:
    wire = encode(DELTA, CodecSpec()) if tensor is None else tensor
    payload = update_payload(wire, LocalWork(samples=256, inner_steps=inner_steps, train_loss=2.5), ANCHOR)
    return sealed("update", payload, signer=signer, round=round)


# The consensus pull: the donor's params as sync_codec (int8) of their change from the shared start.
INITIAL = np.array([0.25, -0.5, 1.0, 0.0, -2.0, 0.75, 0.5, -1.0], dtype=np.float32)
DONOR_PARAMS = INITIAL + np.array([0.5, -0.25, 0.0, 1.0, 0.125, -0.5, 0.25, 0.0625], dtype=np.float32)
PARAMS_ROUND = 12


def params_answer(
    nonce: bytes = NONCE, signer: Identity = DONOR, tensor: dict | None = None, kind: str = "params_sync"
) -> bytes:
    wire = encode_sync(DONOR_PARAMS, INITIAL, GossipConfig()) if tensor is None else tensor
    return sealed(
        kind, {"tensor": wire, "round": PARAMS_ROUND, "nonce": nonce}, signer=signer, round=PARAMS_ROUND
    )


def manifest_msg(signer: Identity = DONOR, **changes: Any) -> bytes:
    payload = {**MANIFEST, **changes}
    return sealed("state_manifest", payload, signer=signer, round=payload["round"])


def tensorfile(header: Any, data: bytes = b"") -> bytes:
    """A tensor file with a hand-made header (for the container's own refusals)."""
    packed = msgpack.packb(header, use_bin_type=True)
    return b"".join([MAGIC, len(packed).to_bytes(8, "little"), packed, data])


def round_array(value: int = STATE_ROUND) -> np.ndarray:
    return np.array([value], dtype=np.int64)


# --- cases ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    name: str  # "<group>_<outcome>_<what>"
    description: str
    build: Callable[[], Any]  # bytes, list of chunks (state), or a JSON value (announce record.json)
    reason: RejectReason | IgnoreReason | None = None  # None = accept
    context: dict[str, Any] = field(default_factory=dict)

    @property
    def group(self) -> str:
        return self.name.split("_", 1)[0]

    @property
    def outcome(self) -> str:
        if self.reason is None:
            return "accept"
        return "ignore" if isinstance(self.reason, IgnoreReason) else "reject"


R, I = RejectReason, IgnoreReason  # noqa: E741 - short names keep the case table readable


def replay_seen(seq: int = 1) -> list[dict[str, Any]]:
    return [{"sender": DONOR.public_key_bytes.hex(), "seq": seq, "timestamp": TS - 30.0}]


def state_case(
    name: str, description: str, blob: bytes, reason: RejectReason | None, manifest_round: int = STATE_ROUND
) -> Case:
    """A state case whose manifest is honest about ``blob`` (so only the contents decide)."""
    manifest, chunks = manifest_payload(blob, manifest_round, CHUNK)
    return Case(name, description, lambda: chunks, reason, {"manifest": hexify(manifest)})


STREAM_CASES = [
    Case(
        "stream_accept_update_on_gossip",
        "the gossip stream takes an update",
        lambda: update(),
        None,
        {"stream": "gossip"},
    ),
    Case(
        "stream_accept_state_request_on_state",
        "the state stream takes a state_request",
        lambda: sealed("state_request", REQUEST),
        None,
        {"stream": "state"},
    ),
    Case(
        "stream_accept_state_request_on_params",
        "the params stream takes a state_request",
        lambda: sealed("state_request", REQUEST),
        None,
        {"stream": "params"},
    ),
    Case(
        "stream_reject_wrong_kind_announce_on_state",
        "a valid announcement sent as a state request",
        lambda: sealed("announce", ANNOUNCE),
        R.WRONG_KIND,
        {"stream": "state"},
    ),
    Case(
        "stream_reject_wrong_kind_announce_on_params",
        "a valid announcement sent as a params request",
        lambda: sealed("announce", ANNOUNCE),
        R.WRONG_KIND,
        {"stream": "params"},
    ),
    Case(
        "stream_reject_wrong_kind_update_on_state",
        "an update sent to the state stream",
        lambda: update(),
        R.WRONG_KIND,
        {"stream": "state"},
    ),
    Case(
        "stream_reject_wrong_kind_manifest_on_state",
        "a state_manifest (an answer) sent as a request",
        lambda: manifest_msg(),
        R.WRONG_KIND,
        {"stream": "state"},
    ),
    Case(
        "stream_reject_wrong_kind_params_sync_on_params",
        "a params_sync (an answer) sent as a request",
        lambda: params_answer(),
        R.WRONG_KIND,
        {"stream": "params"},
    ),
    Case(
        "stream_reject_wrong_kind_state_request_on_gossip",
        "a state_request sent to the gossip stream",
        lambda: sealed("state_request", REQUEST),
        R.WRONG_KIND,
        {"stream": "gossip"},
    ),
    Case(
        "stream_reject_bad_signature_before_kind",
        "order: an announcement with a broken signature on the state stream fails the envelope first",
        lambda: flip_last(sealed("announce", ANNOUNCE)),
        R.BAD_SIGNATURE,
        {"stream": "state"},
    ),
]

UPDATE_CASES = [
    Case("update_accept", "an update for the receiver's own round", lambda: update()),
    Case(
        "update_accept_oldest_round",
        f"round = receiver round - max_round_lag ({RECEIVER_ROUND - LAG})",
        lambda: update(round=RECEIVER_ROUND - LAG),
    ),
    Case(
        "update_accept_newest_round",
        f"round = receiver round + 4 * max_round_lag ({RECEIVER_ROUND + 4 * LAG})",
        lambda: update(round=RECEIVER_ROUND + 4 * LAG),
    ),
    Case(
        "update_accept_inner_steps_max",
        "inner_steps = 2^20, the most an honest peer claims",
        lambda: update(inner_steps=1 << 20),
    ),
    Case(
        "update_accept_lag_zero_newest_round",
        "max_round_lag 0: the future window is still 4 rounds",
        lambda: update(round=RECEIVER_ROUND + 4),
        None,
        {"max_round_lag": 0},
    ),
    Case(
        "update_ignore_banned",
        "a valid update from a banned sender is dropped unread",
        lambda: update(),
        I.BANNED,
        {"banned": True},
    ),
    Case(
        "update_ignore_banned_before_envelope",
        "order: garbage from a banned sender is not even decoded",
        lambda: b"\x00not an envelope",
        I.BANNED,
        {"banned": True},
    ),
    Case(
        "update_reject_bad_signature",
        "envelope rules apply (here: the last signature byte flipped)",
        lambda: flip_last(update()),
        R.BAD_SIGNATURE,
    ),
    Case(
        "update_reject_replay",
        "the gossip stream keeps a replay guard: (sender, seq) already seen",
        lambda: update(),
        R.REPLAY,
        {"replay_seen": replay_seen()},
    ),
    Case(
        "update_reject_wrong_kind",
        "a state_request on the gossip stream",
        lambda: sealed("state_request", REQUEST),
        R.WRONG_KIND,
    ),
    Case(
        "update_reject_bad_update_zero_inner_steps",
        "inner_steps = 0: an update without local work",
        lambda: update(inner_steps=0),
        R.BAD_UPDATE,
    ),
    Case(
        "update_reject_bad_update_too_many_inner_steps",
        "inner_steps = 2^20 + 1",
        lambda: update(inner_steps=(1 << 20) + 1),
        R.BAD_UPDATE,
    ),
    Case(
        "update_reject_bad_update_before_stale_round",
        "order: inner_steps = 0 and a stale round",
        lambda: update(round=RECEIVER_ROUND - LAG - 1, inner_steps=0),
        R.BAD_UPDATE,
    ),
    Case(
        "update_ignore_stale_round",
        f"round {RECEIVER_ROUND - LAG - 1}: more than max_round_lag behind",
        lambda: update(round=RECEIVER_ROUND - LAG - 1),
        I.STALE_ROUND,
    ),
    Case(
        "update_ignore_future_round",
        f"round {RECEIVER_ROUND + 4 * LAG + 1}: beyond 4 * max_round_lag ahead",
        lambda: update(round=RECEIVER_ROUND + 4 * LAG + 1),
        I.FUTURE_ROUND,
    ),
    Case(
        "update_ignore_future_round_lag_zero",
        "max_round_lag 0: 5 rounds ahead is beyond max(0, 1) * 4",
        lambda: update(round=RECEIVER_ROUND + 5),
        I.FUTURE_ROUND,
        {"max_round_lag": 0},
    ),
    Case(
        "update_ignore_stale_round_before_codec",
        "order: a stale round whose tensor has the wrong size",
        lambda: update(
            round=RECEIVER_ROUND - LAG - 1, tensor=encode(np.ones(NUMEL + 1, np.float32), CodecSpec())
        ),
        I.STALE_ROUND,
    ),
    Case(
        "update_reject_shape_mismatch",
        "codec rules: a tensor of 9 elements for a model of 8",
        lambda: update(tensor=encode(np.ones(NUMEL + 1, np.float32), CodecSpec())),
        R.SHAPE_MISMATCH,
    ),
    Case(
        "update_reject_unknown_codec",
        "codec rules: codec 'zstd' is not registered",
        lambda: update(tensor={"codec": "zstd", "numel": NUMEL}),
        R.UNKNOWN_CODEC,
    ),
]

_DONOR_CLAIM = {
    "public_key": DONOR.public_key_bytes.hex(),
    "round": STATE_ROUND,
    "model_hash": MANIFEST["model_hash"].hex(),
}
_NEWER_MANIFEST, _ = manifest_payload(NEWER_STATE, STATE_ROUND + 2, CHUNK)
# another state of the announced round (the donor trained on within it, or a liar's): self-consistent
_SAME_ROUND_MANIFEST, _ = manifest_payload(
    pack_state(PARAMS + 2.0, STATE_ROUND, OPTIMIZER), STATE_ROUND, CHUNK
)
_OTHER_HASH = digest(b"another state")

MANIFEST_CASES = [
    Case("manifest_accept", "the donor's manifest of the state it announced", lambda: manifest_msg()),
    Case(
        "manifest_accept_newer_round",
        "another hash, but a newer round than announced (the donor moved on)",
        lambda: manifest_msg(**_NEWER_MANIFEST),
    ),
    Case(
        "manifest_accept_same_round_other_hash",
        "another hash at the announced round (>= is enough)",
        lambda: manifest_msg(**_SAME_ROUND_MANIFEST),
    ),
    Case(
        "manifest_accept_at_size_limit",
        "total_bytes equal to max_state_bytes",
        lambda: manifest_msg(),
        None,
        {"max_state_bytes": len(STATE)},
    ),
    Case(
        "manifest_accept_without_replay_guard",
        "the same (sender, seq) already seen: manifests are bound by the donor's key, not the guard",
        lambda: manifest_msg(),
        None,
        {"replay_seen": replay_seen()},
    ),
    Case(
        "manifest_reject_bad_signature",
        "envelope rules apply (here: the last signature byte flipped)",
        lambda: flip_last(manifest_msg()),
        R.BAD_SIGNATURE,
    ),
    Case(
        "manifest_reject_wrong_kind",
        "the donor's announcement where a manifest belongs",
        lambda: sealed("announce", ANNOUNCE),
        R.WRONG_KIND,
    ),
    Case(
        "manifest_reject_wrong_kind_before_not_donor",
        "order: a stranger's announcement",
        lambda: sealed("announce", ANNOUNCE, signer=STRANGER),
        R.WRONG_KIND,
    ),
    Case(
        "manifest_reject_not_donor",
        "the same manifest signed by a stranger",
        lambda: manifest_msg(signer=STRANGER),
        R.NOT_DONOR,
    ),
    Case(
        "manifest_reject_not_donor_before_bad_manifest",
        "order: a stranger's manifest of an older state",
        lambda: manifest_msg(signer=STRANGER, round=STATE_ROUND - 1, model_hash=_OTHER_HASH),
        R.NOT_DONOR,
    ),
    Case(
        "manifest_reject_bad_manifest_older_round",
        "another hash and a round older than announced",
        lambda: manifest_msg(round=STATE_ROUND - 1, model_hash=_OTHER_HASH),
        R.BAD_MANIFEST,
    ),
    Case(
        "manifest_reject_bad_manifest_before_oversize",
        "order: an older state that is also too large",
        lambda: manifest_msg(round=STATE_ROUND - 1, model_hash=_OTHER_HASH),
        R.BAD_MANIFEST,
        {"max_state_bytes": len(STATE) - 1},
    ),
    Case(
        "manifest_reject_oversize",
        "total_bytes one over max_state_bytes",
        lambda: manifest_msg(),
        R.OVERSIZE,
        {"max_state_bytes": len(STATE) - 1},
    ),
    Case(
        "manifest_reject_oversize_before_chunk_count",
        "order: too large, and one chunk hash short",
        lambda: manifest_msg(chunk_hashes=MANIFEST["chunk_hashes"][:-1]),
        R.OVERSIZE,
        {"max_state_bytes": len(STATE) - 1},
    ),
    Case(
        "manifest_reject_bad_manifest_too_few_chunks",
        "one chunk hash fewer than ceil(total_bytes / chunk_size)",
        lambda: manifest_msg(chunk_hashes=MANIFEST["chunk_hashes"][:-1]),
        R.BAD_MANIFEST,
    ),
    Case(
        "manifest_reject_bad_manifest_too_many_chunks",
        "one chunk hash more than ceil(total_bytes / chunk_size)",
        lambda: manifest_msg(chunk_hashes=[*MANIFEST["chunk_hashes"], _OTHER_HASH]),
        R.BAD_MANIFEST,
    ),
    Case(
        "manifest_reject_bad_manifest_chunk_size",
        "the right hashes under another chunk_size",
        lambda: manifest_msg(chunk_size=CHUNK * 4),
        R.BAD_MANIFEST,
    ),
    Case(
        "manifest_reject_bad_manifest_root",
        "model_hash that is not the root of its chunk hashes (another state's chunks under the announced hash)",
        lambda: manifest_msg(chunk_hashes=_SAME_ROUND_MANIFEST["chunk_hashes"]),
        R.BAD_MANIFEST,
    ),
    Case(
        "manifest_reject_bad_manifest_root_whole_hash",
        "model_hash = SHA-256 of the whole state (the rule before the root): refused",
        lambda: manifest_msg(model_hash=digest(STATE)),
        R.BAD_MANIFEST,
    ),
]

_LAST = len(CHUNKS) - 1
CHUNK_CASES = [
    Case("chunk_accept_first", "chunk 0 as listed", lambda: CHUNKS[0], None, {"index": 0}),
    Case(
        "chunk_accept_last_shorter",
        "the last chunk, shorter than chunk_size",
        lambda: CHUNKS[_LAST],
        None,
        {"index": _LAST},
    ),
    Case(
        "chunk_reject_hash_mismatch_flipped_byte",
        "chunk 0 with its first byte changed",
        lambda: bytes([CHUNKS[0][0] ^ 1]) + CHUNKS[0][1:],
        R.HASH_MISMATCH,
        {"index": 0},
    ),
    Case(
        "chunk_reject_hash_mismatch_out_of_order",
        "chunk 1 where chunk 0 belongs",
        lambda: CHUNKS[1],
        R.HASH_MISMATCH,
        {"index": 0},
    ),
    Case(
        "chunk_reject_hash_mismatch_truncated",
        "chunk 0 without its last byte",
        lambda: CHUNKS[0][:-1],
        R.HASH_MISMATCH,
        {"index": 0},
    ),
    Case(
        "chunk_reject_hash_mismatch_padded",
        "the last chunk padded with zeros to chunk_size",
        lambda: CHUNKS[_LAST].ljust(CHUNK, b"\x00"),
        R.HASH_MISMATCH,
        {"index": _LAST},
    ),
]

_GOOD_ARRAYS = {"params": PARAMS, "round": round_array()}
STATE_CASES = [
    Case("state_accept", "params, round and optimizer moments, matching the manifest", lambda: CHUNKS),
    Case(
        "state_reject_hash_mismatch_missing_chunk",
        "the last chunk missing: fewer bytes than total_bytes",
        lambda: CHUNKS[:-1],
        R.HASH_MISMATCH,
    ),
    Case(
        "state_reject_hash_mismatch_model_hash",
        "chunks match their hashes, model_hash is not their root (a lying manifest, checked again here)",
        lambda: CHUNKS,
        R.HASH_MISMATCH,
        {"manifest": hexify({**MANIFEST, "model_hash": _OTHER_HASH})},
    ),
    state_case(
        "state_reject_malformed_magic",
        "verified bytes that are not a tensor file (bad magic)",
        b"NOTATENS" + STATE[8:],
        R.MALFORMED,
    ),
    state_case(
        "state_reject_schema_header",
        "a tensor file header with an extra key",
        tensorfile({"meta": {}, "arrays": [], "extra": 1}),
        R.SCHEMA,
    ),
    state_case(
        "state_reject_shape_mismatch_nbytes",
        "an array whose nbytes disagrees with its shape",
        tensorfile(
            {
                "meta": {},
                "arrays": [
                    {"name": "params", "dtype": "<f4", "shape": [NUMEL], "offset": 0, "nbytes": 4 * NUMEL - 4}
                ],
            },
            PARAMS.tobytes()[:-4],
        ),
        R.SHAPE_MISMATCH,
    ),
    state_case(
        "state_reject_bad_state_no_params",
        "no params array",
        pack_arrays({"round": round_array()}),
        R.BAD_STATE,
    ),
    state_case(
        "state_reject_bad_state_params_float16",
        "params stored as float16",
        pack_arrays({**_GOOD_ARRAYS, "params": PARAMS.astype(np.float16)}),
        R.BAD_STATE,
    ),
    state_case(
        "state_reject_bad_state_params_size",
        f"params of {NUMEL + 1} elements for a model of {NUMEL}",
        pack_arrays({**_GOOD_ARRAYS, "params": np.append(PARAMS, np.float32(1.0))}),
        R.BAD_STATE,
    ),
    state_case(
        "state_reject_bad_state_params_2d",
        "params of the right size in a 2-D shape",
        pack_arrays({**_GOOD_ARRAYS, "params": PARAMS.reshape(2, NUMEL // 2)}),
        R.BAD_STATE,
    ),
    state_case(
        "state_reject_bad_state_no_round", "no round array", pack_arrays({"params": PARAMS}), R.BAD_STATE
    ),
    state_case(
        "state_reject_bad_state_round_int32",
        "round stored as int32",
        pack_arrays({**_GOOD_ARRAYS, "round": np.array([STATE_ROUND], np.int32)}),
        R.BAD_STATE,
    ),
    state_case(
        "state_reject_bad_state_round_two_elements",
        "round of two elements",
        pack_arrays({**_GOOD_ARRAYS, "round": np.array([STATE_ROUND, 0], np.int64)}),
        R.BAD_STATE,
    ),
    state_case(
        "state_reject_bad_state_round_differs",
        "the state says round 6, its manifest round 7",
        pack_arrays({**_GOOD_ARRAYS, "round": round_array(STATE_ROUND - 1)}),
        R.BAD_STATE,
    ),
    state_case(
        "state_reject_bad_state_non_finite",
        "a NaN among the params",
        pack_arrays(
            {**_GOOD_ARRAYS, "params": np.where(np.arange(NUMEL) == 3, np.nan, PARAMS).astype(np.float32)}
        ),
        R.BAD_STATE,
    ),
]

PARAMS_CASES = [
    Case("params_accept", "the donor's int8 answer to our nonce", lambda: params_answer()),
    Case(
        "params_reject_bad_signature",
        "envelope rules apply (here: the last signature byte flipped)",
        lambda: flip_last(params_answer()),
        R.BAD_SIGNATURE,
    ),
    Case(
        "params_reject_replay",
        "answers pass the replay guard: (sender, seq) already seen",
        lambda: params_answer(),
        R.REPLAY,
        {"replay_seen": replay_seen()},
    ),
    Case(
        "params_reject_wrong_kind",
        "the donor's state_manifest where a params_sync belongs",
        lambda: manifest_msg(),
        R.WRONG_KIND,
    ),
    Case(
        "params_reject_wrong_kind_before_not_donor",
        "order: a stranger's update",
        lambda: update(signer=STRANGER),
        R.WRONG_KIND,
    ),
    Case(
        "params_reject_not_donor_signer",
        "a stranger's answer echoing our nonce",
        lambda: params_answer(signer=STRANGER),
        R.NOT_DONOR,
    ),
    Case(
        "params_reject_not_donor_nonce",
        "the donor's answer to another request (another nonce)",
        lambda: params_answer(nonce=OTHER_NONCE),
        R.NOT_DONOR,
    ),
    Case(
        "params_reject_not_donor_before_codec",
        "order: another nonce and a tensor of the wrong size",
        lambda: params_answer(
            nonce=OTHER_NONCE, tensor=encode(np.ones(NUMEL + 1, np.float32), CodecSpec("int8"))
        ),
        R.NOT_DONOR,
    ),
    Case(
        "params_reject_shape_mismatch",
        "codec rules: 9 elements for a model of 8",
        lambda: params_answer(tensor=encode(np.ones(NUMEL + 1, np.float32), CodecSpec("int8"))),
        R.SHAPE_MISMATCH,
    ),
    Case(
        "params_reject_unknown_codec",
        "codec rules: codec 'zstd' is not registered",
        lambda: params_answer(tensor={"codec": "zstd", "numel": NUMEL}),
        R.UNKNOWN_CODEC,
    ),
]

_ALLOWANCE = EnvelopeLimits().max_clock_skew_s + TTL_S
ANNOUNCE_CASES = [
    Case(
        "announce_accept",
        "a fresh announcement under its signer's peer id",
        lambda: sealed("announce", ANNOUNCE),
    ),
    Case(
        "announce_accept_paused",
        "a paused peer's announcement: the optional paused reason is read back",
        lambda: sealed("announce", {**ANNOUNCE, "paused": "on battery (35%)"}),
    ),
    Case(
        "announce_accept_tombstone",
        "no addresses: a signed tombstone is a valid record",
        lambda: sealed("announce", {**ANNOUNCE, "maddrs": []}),
    ),
    Case(
        "announce_accept_aged_to_the_allowance",
        f"signed max_clock_skew_s + ttl_s ({_ALLOWANCE:g} s) ago",
        lambda: sealed("announce", ANNOUNCE, ts=NOW - _ALLOWANCE),
    ),
    Case(
        "announce_accept_future_within_allowance",
        f"dated {_ALLOWANCE:g} s ahead: the allowance is symmetric (the envelope's |ts - now| rule)",
        lambda: sealed("announce", ANNOUNCE, ts=NOW + _ALLOWANCE),
    ),
    Case(
        "announce_accept_reread_without_replay_guard",
        "the same (sender, seq) already seen: records are re-read on every lookup",
        lambda: sealed("announce", ANNOUNCE),
        None,
        {"replay_seen": replay_seen()},
    ),
    Case(
        "announce_accept_energy_claims",
        "with the optional energy totals (energy_wh, marginal_wh, tokens, energy_source, grid_g_per_kwh)",
        lambda: sealed("announce", {**ANNOUNCE, **ENERGY}),
    ),
    Case(
        "announce_reject_malformed_not_bytes",
        "the DHT returned a string, not bytes",
        lambda: "not an envelope",
        R.MALFORMED,
    ),
    Case(
        "announce_reject_clock_skew_too_old",
        f"signed {_ALLOWANCE + 0.5:g} s ago, past the allowance",
        lambda: sealed("announce", ANNOUNCE, ts=NOW - _ALLOWANCE - 0.5),
        R.CLOCK_SKEW,
    ),
    Case(
        "announce_reject_bad_signature",
        "envelope rules apply (here: the last signature byte flipped)",
        lambda: flip_last(sealed("announce", ANNOUNCE)),
        R.BAD_SIGNATURE,
    ),
    Case(
        "announce_reject_wrong_kind",
        "a state_request stored as the signer's record",
        lambda: sealed("state_request", REQUEST),
        R.WRONG_KIND,
    ),
    Case(
        "announce_reject_wrong_kind_before_subkey",
        "order: a state_request under another peer's subkey",
        lambda: sealed("state_request", REQUEST),
        R.WRONG_KIND,
        {"subkey": STRANGER.peer_id},
    ),
    Case(
        "announce_reject_subkey_mismatch",
        "a valid announcement stored under a stranger's peer id",
        lambda: sealed("announce", ANNOUNCE),
        R.SUBKEY_MISMATCH,
        {"subkey": STRANGER.peer_id},
    ),
]

GROUP_CONTEXTS: dict[str, dict[str, Any]] = {
    "stream": {},
    "update": {
        "receiver_round": RECEIVER_ROUND,
        "max_round_lag": LAG,
        "numel": NUMEL,
        "remote": REMOTE,
        "banned": False,
    },
    "manifest": {"donor": _DONOR_CLAIM, "max_state_bytes": 1 << 20},
    "chunk": {"manifest": hexify(MANIFEST)},
    "state": {"manifest": hexify(MANIFEST), "numel": NUMEL, "max_state_bytes": 1 << 20},
    "want": {"manifest": hexify(MANIFEST)},
    "params": {
        "donor_key": DONOR.public_key_bytes.hex(),
        "nonce": NONCE.hex(),
        "initial": [v.item() for v in INITIAL],
    },
    "announce": {
        "subkey": DONOR.peer_id,
        "ttl_s": TTL_S,
        "limits": {"max_clock_skew_s": EnvelopeLimits().max_clock_skew_s},
    },
}
"""What the receiver knows in each group; a case's own context entries replace these."""

N_CHUNKS = len(MANIFEST["chunk_hashes"])


def want_request(ranges: list, model_hash: bytes | None = None) -> bytes:
    want = {"model_hash": MANIFEST["model_hash"] if model_hash is None else model_hash, "ranges": ranges}
    return sealed_unchecked("state_request", {**REQUEST, "want": want})


WANT_CASES = [
    Case("want_accept_no_want", "a request without want: every chunk, in order", lambda: sealed("state_request", REQUEST)),
    Case("want_accept_ranges", "ranges of the served state: exactly their chunks, ascending", lambda: want_request([[0, 1], [2, 4]])),
    Case("want_accept_empty", "no range: the manifest alone (the joiner holds every chunk)", lambda: want_request([])),
    Case("want_accept_last_chunk", "the range that ends at the last chunk", lambda: want_request([[N_CHUNKS - 1, N_CHUNKS]])),
    Case(
        "want_accept_other_state",
        "ranges of another state (the donor moved on): every chunk, no refusal",
        lambda: want_request([[0, 1]], _OTHER_HASH),
    ),
    Case("want_reject_bad_index_beyond", "a range past the last chunk", lambda: want_request([[0, N_CHUNKS + 1]]), RejectReason.BAD_INDEX),
    Case("want_reject_bad_index_overlapping", "overlapping ranges", lambda: want_request([[0, 2], [1, 3]]), RejectReason.BAD_INDEX),
    Case("want_reject_bad_index_descending", "ranges out of order", lambda: want_request([[3, 4], [0, 1]]), RejectReason.BAD_INDEX),
    Case("want_reject_bad_index_empty_range", "a range [2, 2) of no chunk", lambda: want_request([[2, 2]]), RejectReason.BAD_INDEX),
    Case("want_reject_bad_index_not_a_pair", "a range of one number", lambda: want_request([[1]]), RejectReason.BAD_INDEX),
    Case("want_reject_schema_negative", "a range starting below 0 (ints in a want are >= 0)", lambda: want_request([[-1, 1]]), RejectReason.SCHEMA),
    Case(
        "want_reject_schema_too_many_ranges",
        f"{MAX_WANT_RANGES + 1} ranges: over the schema's bound, refused before any is looked at",
        lambda: want_request([[2 * i, 2 * i + 1] for i in range(MAX_WANT_RANGES + 1)]),
        RejectReason.SCHEMA,
    ),
    Case("want_reject_schema_short_hash", "a want whose model_hash is not 32 bytes", lambda: want_request([], b"short"), RejectReason.SCHEMA),
]  # fmt: skip

MANIFEST_CASES.append(
    Case(
        "manifest_reject_oversize_chunk_size_before_chunk_count",
        "order: chunk_size over MAX_CHUNK_BYTES (and so a wrong chunk count): each chunk is one frame in memory",
        lambda: manifest_msg(chunk_size=MAX_CHUNK_BYTES + 1),
        RejectReason.OVERSIZE,
    )
)

CASES: list[Case] = [
    *STREAM_CASES,
    *UPDATE_CASES,
    *MANIFEST_CASES,
    *CHUNK_CASES,
    *STATE_CASES,
    *WANT_CASES,
    *PARAMS_CASES,
    *ANNOUNCE_CASES,
]


def context_of(case: Case) -> dict[str, Any]:
    return {"group": case.group, "run_id": RUN, "now": NOW, **GROUP_CONTEXTS[case.group], **case.context}


def input_files(case: Case, data: Any) -> dict[str, str]:
    """The case's input file(s), by name."""
    if case.group == "chunk":
        return {"chunk.hex": data.hex() + "\n"}
    if case.group == "state":
        return {"chunks.hex": "".join(piece.hex() + "\n" for piece in data)}
    if case.group == "announce":
        if isinstance(data, bytes):
            return {"record.hex": data.hex() + "\n"}
        return {"record.json": _dump(data)}
    return {"envelope.hex": data.hex() + "\n"}


def expected_of(case: Case, context: dict[str, Any], data: Any) -> dict[str, Any]:
    """The case's verdict: its reason as written above, or for an accept what the code returns."""
    if case.reason is not None:
        return {"outcome": case.outcome, "reason": case.reason.value, "description": case.description}
    try:
        result = run_case(context, data)
    except Refusal as exc:  # a case list that disagrees with the code: fix one of them, never the files
        raise AssertionError(f"{case.name}: expected accept, code says {exc}") from None
    return {"outcome": "accept", "description": case.description, "result": result}


def _dump(value: Any) -> str:
    return json.dumps(value, indent=2, sort_keys=False, ensure_ascii=True) + "\n"


def write_vectors(out_dir: Path) -> list[Path]:
    """Write the README and every case under ``out_dir/transfer``; return the files written."""
    root = Path(out_dir) / "transfer"
    root.mkdir(parents=True, exist_ok=True)
    (root / "README.md").write_text(README)
    written = [root / "README.md"]
    for case in CASES:
        data = case.build()
        context = context_of(case)
        folder = root / case.name
        folder.mkdir(exist_ok=True)
        files = {
            **input_files(case, data),
            "context.json": _dump(context),
            "expected.json": _dump(expected_of(case, context, data)),
        }
        for name, text in files.items():
            (folder / name).write_text(text)
            written.append(folder / name)
    return written


def main(argv: list[str]) -> int:
    out_dir = Path(argv[1]) if len(argv) > 1 else VECTORS_DIR
    written = write_vectors(out_dir)
    print(f"wrote {len(written)} files under {out_dir / 'transfer'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
