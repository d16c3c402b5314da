"""Typed metrics records: what each line of ``metrics.jsonl`` holds, by event.

The daemon writes these and readers (swarm summaries, benches, tests) get the same field
names back: one definition instead of 20-key dict literals written in one module and read
by string in three others. :func:`as_record` turns one into the JSON-ready dict that
:class:`~p2pfm.daemon.metrics.MetricsLog` writes (NaN becomes null there).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class StartRecord:
    """The peer is online and about to train (after the quorum wait)."""

    round: int
    resumed: bool
    params: int
    shard: int
    initial_eval_loss: float
    wall_time: float
    data_split: dict[str, Any] = field(default_factory=dict)  # the byte split (absent for a user's model)
    event: str = "start"

    def as_dict(self) -> dict[str, Any]:
        record = asdict(self)
        record.update(record.pop("data_split"))  # flat, as readers have always seen it
        return record


@dataclass(frozen=True)
class RoundRecord:
    """One finished round: progress, traffic counters (cumulative), refusals, time and energy."""

    round: int
    step: int
    samples: int
    train_loss: float
    eval_loss: float
    received_updates: int
    synced: bool
    live_peers: int
    bytes_sent: int
    update_bytes_sent: int
    sync_bytes_sent: int
    state_bytes_served: int
    bytes_received: int
    state_bytes_downloaded: int
    messages_accepted: int
    messages_rejected: dict[str, int]  # by RejectReason value: these lowered a sender's score
    messages_ignored: dict[str, int]  # by IgnoreReason value: authentic but unused, no penalty
    push_failures: int
    rolled_back_steps: int  # merged steps dropped because they would have made the model NaN/Inf
    compute_seconds: float
    round_seconds: float
    gossip_seconds: float  # from the end of the local steps to the end of the round (below, and waits)
    eval_seconds: float
    encode_seconds: float  # flatten the model, top-k + int8 with error feedback, sign
    merge_seconds: float  # decode the inbox, aggregate, outer step, load into the model
    snapshot_seconds: float  # pack and hash the state we serve
    receive_seconds: float  # cumulative: verifying, checking and decoding others' updates on arrival
    wall_time: float
    energy_wh: float
    carbon_g: float
    params: int
    dht_records_ignored: dict[str, int]
    diverged_rounds: int = 0  # rounds whose local steps went NaN/Inf: nothing sent, the others merged
    round_errors: int = 0  # rounds that raised and were retried from the last good anchor
    bans: int = 0  # bans decided so far (transports and signing keys), each also logged once
    syncs_refused: int = 0  # pulled parameters too far from ours to mix (cumulative)
    # Energy since the process started (p2pfm.energy): energy_wh/carbon_g above are attributable
    # (the device's draw while training); marginal is above the idle baseline; source names the meter.
    marginal_wh: float = 0.0
    marginal_carbon_g: float = 0.0
    tokens: int = 0  # samples x block size (bytes for the byte-level GPT)
    j_per_token: float | None = None
    energy_source: str = ""
    idle_w: float = 0.0
    event: str = "round"


@dataclass(frozen=True)
class StateDownloadRecord:
    """We adopted a donor's state (on joining, or because we lagged too far)."""

    reason: str  # "join", "rejoin" or "lagging"
    donor: str
    round: int
    behind: int
    wall_time: float
    bytes: int = 0  # the state's size (bytes_fetched + bytes_reused)
    bytes_fetched: int = 0  # verified bytes this donor sent
    bytes_reused: int = 0  # verified bytes kept from earlier donors' interrupted transfers
    seconds: float = 0.0  # the last donor's transfer, manifest to last chunk
    rate_bps: float = 0.0  # bytes_fetched / seconds: the link rate the download measured
    model_hash: str = ""  # hex SHA-256 of the adopted state (its manifest's, checked on the whole file)
    via: str = "stream"  # how the chunks came: "stream" (libp2p), "lane" (direct, sealed), "lane+stream"
    event: str = "state_download"


@dataclass(frozen=True)
class StateRefusedRecord:
    """A donor's verified state was not adopted: a second peer's parameters disagree with it."""

    donor: str
    round: int
    witness: str  # the peers that disagreed, comma-separated
    reason: str  # "disagrees" or "unconfirmed" (no second peer answered)
    wall_time: float
    event: str = "state_refused"


@dataclass(frozen=True)
class QuorumTimeoutRecord:
    """We stopped waiting for the partners we expected and trained with those we had."""

    need: int
    have: int
    seen: list[str]
    confirmed: list[str]
    unconfirmed: list[str]
    waited_s: float
    wall_time: float
    event: str = "quorum_timeout"


@dataclass(frozen=True)
class DrainRecord:
    """After the last round: updates of slower peers applied without a round of our own."""

    round: int
    applied: int
    eval_loss: float
    wall_time: float
    event: str = "drain"


@dataclass(frozen=True)
class LeaveRecord:
    """Graceful leave: checkpoint written, tombstone announced."""

    round: int
    wall_time: float
    event: str = "leave"


@dataclass(frozen=True)
class PauseRecord:
    """The energy policy paused us between rounds: checkpoint written, state kept (``state_hash``)."""

    round: int
    reason: str
    state_hash: str  # hex SHA-256 of the state we hold (and serve) while paused
    wall_time: float
    event: str = "pause"


@dataclass(frozen=True)
class ResumeRecord:
    """The policy allows training again: how long we were paused, and whether we caught up."""

    round: int  # after catching up (if we did)
    paused_round: int  # the round we paused at
    paused_s: float
    reason: str  # what the rules saw when they allowed us again
    state_hash: str  # hex SHA-256 of our state on resuming, before any catch-up (= the pause's)
    behind: int  # how far the swarm's corroborated round was ahead of us (0: not ahead)
    caught_up: bool  # adopted a donor's state
    wall_time: float
    event: str = "resume"


Record = (
    StartRecord
    | RoundRecord
    | StateDownloadRecord
    | QuorumTimeoutRecord
    | DrainRecord
    | LeaveRecord
    | PauseRecord
    | ResumeRecord
)


def as_record(record: Record) -> dict[str, Any]:
    """The JSON-ready dict of one typed record."""
    if isinstance(record, StartRecord):
        return record.as_dict()
    return asdict(record)
