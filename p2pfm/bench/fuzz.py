"""``p2pfm bench fuzz``: a fuzz campaign against a live peer's stream handlers, over real libp2p.

By default it starts one real ``p2pfm peer`` on loopback in a temp dir (an open swarm, a tiny
model, training alone round after round so that each round's inbox clears), or attaches to one
with ``--target MADDR``. It learns the target's model size and round from a parameter request,
then sends ``--count`` messages of :mod:`p2pfm.bench.fuzz_cases` over the ``gossip``, ``state``
and ``params`` streams, one stream each, several in flight, and classifies every answer:
accepted, rejected or ignored (by the reason in the refusal map), or dropped (no answer, with
why). Figures: ``accepted_invalid`` (invalid by construction, yet accepted: must be 0) and
``crashes`` (the target died, its log shows a traceback or an ERROR, or it did not answer valid
controls at the end: must be 0).

Whom the target scores, and how the campaign keeps every rule in reach:

- Envelope faults count against the *transport* (the libp2p id), which is banned after
  ``BAN_AFTER_REJECTIONS``. Each libp2p host of ours sends at most that many minus one
  invalid messages and is replaced by a fresh one (a new key and ``p2pd``, started ahead in
  the background). One host is banned on purpose (``ban_check``) to see ``banned`` answered.
- Past the envelope a peer only looks at *members*: keys announced in the swarm's DHT from the
  transport the stream comes from (anyone else is ``unknown_sender``). :class:`AnnouncedMembers`
  runs a DHT node of ours that announces fresh member keys; controls and the key-level
  mutations (codec, update metadata, rounds) are signed by them and sent from that node's host.
  A key is retired within its update and request bursts and long before its own ban.
- Rate limits (``rate_limited``) and full rounds (``round_full``) are counted like any other
  answer; after a ``rate_limited`` the campaign pauses between batches (doubling, at most 2 s).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import re
import secrets
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import msgpack

from p2pfm.bench.fuzz_cases import FRAME_HEADER, STREAMS, FuzzMessage, MessageFactory, TargetInfo, frame_of
from p2pfm.config import require
from p2pfm.core.envelope import EnvelopeLimits, open_envelope, seal
from p2pfm.core.errors import IgnoreReason, Refusal
from p2pfm.core.identity import Identity
from p2pfm.core.scoring import BAN_AFTER_REJECTIONS
from p2pfm.core.tensorfile import digest

ANSWER_KINDS = {"state": "state_manifest", "params": "params_sync"}
IGNORE_REASONS = frozenset(r.value for r in IgnoreReason)
PACING_REASONS = frozenset({"rate_limited"})  # a target's rate limit: slow down, it is no bug
ERROR_LINE = re.compile(r"Traceback \(most recent call last\)| ERROR | CRITICAL ")
TINY_MODEL = ["--n-layer", "1", "--n-embd", "32", "--n-head", "2", "--block-size", "32", "--batch-size", "4",
              "--eval-batches", "1"]  # fmt: skip
"""The launched target's model (~22k parameters): handlers, not training, are under test."""
TRAINING = ["--min-peers", "1", "--fanout", "0", "--sync-every", "0", "--inner-steps", "100",
            "--eval-every", "0"]  # fmt: skip
"""The launched target trains alone, round after round: a round's inbox counts at most 16 updates
and clears when the round ends, so an idle peer would soon answer every update ``round_full``
before decoding it. Fanout 0 and no syncs: it never calls the member keys we announce."""


@dataclass(frozen=True)
class FuzzConfig:
    """One campaign. Defaults carry their reasons."""

    count: int = 10_000  # messages; the README's figure is a 100k run
    seed: int = 0
    target: str | None = None  # a live peer's full multiaddr; None = launch one on loopback
    run_id: str | None = None  # the target's run id (required with target; else "fuzz-<seed>")
    target_log: Path | None = None  # an attached target's log, scanned for tracebacks
    work_dir: Path | None = None  # the launched target's work dir (default: a temp dir, removed)
    concurrency: int = 16  # streams in flight; 2 cores saturate around here (measured: README)
    control_fraction: float = 0.02  # valid messages among the rest: the target must keep working
    check_every: int = 2_000  # messages between liveness checks (process, log, one control per stream)
    timeout_s: float = 10.0  # per stream: open, write, answer
    ban_check: bool = True  # ban one host on purpose, to see the ban answered
    extra_peer_args: tuple[str, ...] = ()  # more flags for the launched target (e.g. --open)

    def __post_init__(self) -> None:
        require(self.count >= 1, "count", "must be at least 1")
        require(0.0 < self.control_fraction < 1.0, "control_fraction", "must be in (0, 1)")
        require(self.concurrency >= 1, "concurrency", "must be at least 1")
        require(self.check_every >= 1, "check_every", "must be at least 1")
        require(self.timeout_s > 0, "timeout_s", "must be positive")
        require(self.target is None or "/p2p/" in self.target, "target", "needs the /p2p/<peer id> part")
        require(self.target is None or bool(self.run_id), "run_id", "is required with --target")


# --- sending: one stream per message ------------------------------------------------------------
class Sender(Protocol):
    """One identity the target sees (a libp2p host, or a remote name in tests)."""

    async def exchange(
        self, message: FuzzMessage, timeout: float, more_frames: Callable[[bytes], int]
    ) -> tuple[list[bytes], str | None]: ...

    async def close(self) -> None: ...


SenderFactory = Callable[[], Awaitable[Sender]]


class LibP2PSender:
    """A libp2p host of our own (``p2pfm.daemon.probe``'s connection code)."""

    def __init__(self, p2p: Any, target: Any, run_id: str) -> None:
        self.p2p, self.target, self.run_id = p2p, target, run_id

    @classmethod
    async def start(cls, maddr: str, run_id: str) -> LibP2PSender:
        from p2pfm.daemon.probe import open_host

        p2p, target = await open_host(maddr)
        return cls(p2p, target, run_id)

    async def exchange(
        self, message: FuzzMessage, timeout: float, more_frames: Callable[[bytes], int]
    ) -> tuple[list[bytes], str | None]:
        from p2pfm.daemon.probe import exchange_raw

        protocol = f"/p2pfm/{self.run_id}/{message.stream}/1"
        return await exchange_raw(
            self.p2p, self.target, protocol, message.frame, timeout=timeout,
            answer=message.expect_answer, more_frames=more_frames,
        )  # fmt: skip

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.p2p.shutdown()


# --- what an answer means -----------------------------------------------------------------------
def state_chunks(first: bytes) -> int:
    """How many chunk frames follow a state answer (its manifest's count; 0 for a refusal)."""
    try:
        wire = msgpack.unpackb(first)
        if not isinstance(wire, list):
            return 0
        return min(len(msgpack.unpackb(wire[0])["payload"]["chunk_hashes"]), 65536)
    except Exception:  # not a manifest: classify() names it
        return 0


@dataclass(frozen=True)
class Outcome:
    """How the target treated one message: accepted, rejected, ignored or dropped, and why."""

    verdict: str
    reason: str
    round: int | None = None  # a params answer's round
    numel: int | None = None  # a params answer's model size


def classify(
    message: FuzzMessage, frames: list[bytes], error: str | None, run_id: str, now: float
) -> Outcome:
    """Read the target's answer to ``message``."""
    if not frames:
        return Outcome("dropped", error or "no_answer")
    try:
        answer = msgpack.unpackb(frames[0])
    except Exception:
        return Outcome("dropped", "bad_answer")
    if isinstance(answer, dict):
        if answer.get("ok") is False:
            reason = str(answer.get("reason"))[:64]
            return Outcome("ignored" if reason in IGNORE_REASONS else "rejected", reason)
        if answer.get("ok") is True and message.stream == "gossip":
            return Outcome("accepted", "ok")
        return Outcome("dropped", "bad_answer")
    if message.stream not in ANSWER_KINDS:
        return Outcome("dropped", "bad_answer")
    return _check_answer(message, frames, error, run_id, now)


def _check_answer(
    message: FuzzMessage, frames: list[bytes], error: str | None, run_id: str, now: float
) -> Outcome:
    """A state or params answer: a signed envelope of the right kind (and its chunks, its nonce)."""
    try:
        envelope = open_envelope(frames[0], run_id=run_id, now=now, limits=EnvelopeLimits())
    except Refusal as exc:
        return Outcome("dropped", f"bad_answer:{exc.reason.value}")
    if envelope.kind != ANSWER_KINDS[message.stream]:
        return Outcome("dropped", f"bad_answer:{envelope.kind}")
    payload = envelope.payload
    if message.stream == "params":
        if message.nonce is not None and payload["nonce"] != message.nonce:
            return Outcome("dropped", "bad_answer:nonce")
        tensor = payload["tensor"]
        numel = tensor.get("numel") if isinstance(tensor, dict) else None
        return Outcome("accepted", "answered", round=payload["round"], numel=numel)
    hashes = payload["chunk_hashes"]
    if error is not None or len(frames) != len(hashes) + 1:
        return Outcome("dropped", f"bad_answer:chunks:{error}")
    if any(digest(chunk) != expected for chunk, expected in zip(frames[1:], hashes, strict=True)):
        return Outcome("dropped", "bad_answer:chunk_hash")
    return Outcome("accepted", "answered", round=payload["round"])


EXAMPLES_KEPT = {"accepted_invalid": 20, "control_failed": 10, "unanswered": 5}


# --- the tally ----------------------------------------------------------------------------------
@dataclass
class Tally:
    """Counts by verdict and reason, the controls, the anomalies, and a few examples of each."""

    tried: int = 0
    accepted: int = 0
    rejected: Counter[str] = field(default_factory=Counter)
    ignored: Counter[str] = field(default_factory=Counter)
    dropped: Counter[str] = field(default_factory=Counter)
    accepted_invalid: int = 0
    controls: int = 0
    controls_ok: int = 0
    controls_failed: Counter[str] = field(default_factory=Counter)
    crashes: list[str] = field(default_factory=list)
    by_family: dict[str, Counter[str]] = field(default_factory=lambda: defaultdict(Counter))
    examples: list[dict[str, Any]] = field(default_factory=list)  # accepted invalid, failed controls
    senders: int = 0
    paced_s: float = 0.0

    def add(self, message: FuzzMessage, outcome: Outcome) -> None:
        self.tried += 1
        if outcome.verdict == "accepted":
            self.accepted += 1
        else:
            getattr(self, outcome.verdict)[outcome.reason] += 1
        label = outcome.verdict if outcome.verdict == "accepted" else f"{outcome.verdict}:{outcome.reason}"
        self.by_family[message.family][label] += 1
        if message.valid:
            self.controls += 1
            if outcome.verdict == "accepted" or outcome.reason in CONTROL_OK:
                self.controls_ok += 1
            else:
                self.controls_failed[label] += 1
                self._example("control_failed", message, outcome)
        elif outcome.verdict == "accepted":
            self.accepted_invalid += 1
            self._example("accepted_invalid", message, outcome)
        elif outcome.verdict == "dropped" and message.expect_answer:
            self._example("unanswered", message, outcome)

    def _example(self, what: str, message: FuzzMessage, outcome: Outcome) -> None:
        """Keep the first few of each kind (an accepted invalid message must never be crowded out)."""
        if sum(e["what"] == what for e in self.examples) < EXAMPLES_KEPT[what]:
            self.examples.append(
                {"what": what, "index": message.index, "stream": message.stream, "case": message.case,
                 "outcome": f"{outcome.verdict}:{outcome.reason}", "frame_hex": message.frame[:2048].hex()}
            )  # fmt: skip


# --- the target ---------------------------------------------------------------------------------
class TargetWatch:
    """Liveness of the target beyond its answers: its process (if ours) and its log."""

    def __init__(self, log_path: Path | None, process: Any = None) -> None:
        self.log_path = log_path
        self.process = process
        self._offset = log_path.stat().st_size if log_path and log_path.exists() else 0
        self.died = False

    def problems(self) -> list[str]:
        """New crash evidence since the last call (each piece reported once)."""
        found = []
        if self.process is not None and not self.died and self.process.poll() is not None:
            self.died = True
            found.append(f"target process exited with status {self.process.returncode}")
        if self.log_path is not None and self.log_path.exists():
            with self.log_path.open("rb") as handle:
                handle.seek(self._offset)
                chunk = handle.read()
            end = chunk.rfind(b"\n") + 1  # whole lines only; the rest next time
            self._offset += end
            for line in chunk[:end].decode("utf-8", "replace").splitlines():
                if ERROR_LINE.search(line):
                    found.append(f"target log: {line.strip()[:300]}")
        return found


def launch_target(config: FuzzConfig, work_dir: Path) -> tuple[Any, str, str]:
    """Start one ``p2pfm peer`` that serves and idles; return (PeerProcess, its maddr, run id)."""
    import p2pfm
    from p2pfm.procs import child_env
    from p2pfm.swarm import PeerProcess

    run_id = config.run_id or f"fuzz-{config.seed}"
    work_dir = work_dir.resolve()  # the target runs from the package root, not from our cwd
    env = child_env(1)
    # The target runs the very package we import (a worktree's, not whatever is installed).
    package_root = str(Path(p2pfm.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH", "")) if p)
    args = [
        "--work-dir", str(work_dir), "--key", str(work_dir / "peer.key"), "--run-id", run_id,
        "--threads", "1", *TRAINING, *TINY_MODEL,
        *config.extra_peer_args,
    ]  # fmt: skip

    def launcher(argv: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen:
        # procs.launch, but run from the package's root: ``python -m`` puts the cwd first on sys.path.
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("ab") as handle:
            return subprocess.Popen(argv, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True,
                                    env=env, cwd=package_root)  # fmt: skip

    peer = PeerProcess(index=0, work_dir=work_dir, args=args, env=env, launcher=launcher)
    peer.start()
    status = peer.wait_ready(timeout=180.0)
    return peer, status["maddrs"][0], run_id


# --- members: keys the target counts ---------------------------------------------------------------
class Members(Protocol):
    """Keys the target knows as announced peers, all bound to one transport of ours (``sender``)."""

    sender: Sender

    async def next_key(self) -> Identity: ...

    def retire(self, key: Identity) -> None: ...

    async def close(self) -> None: ...


class AnnouncedMembers:
    """Member keys for a live target: a DHT node of ours (``PeerNetwork``, the daemon's own code)
    joins the target's swarm and stores a signed announcement for each key, binding it to the
    node's libp2p host, refreshed every ``ttl_s / 4`` until the key is retired.

    A key is handed out ``lead_s`` after its first announcement (the target must have read it:
    a training peer looks every heartbeat, 4 s by default); ``ahead`` keys wait ready.
    """

    def __init__(
        self, maddr: str, run_id: str, seed: int, *, ttl_s: float = 15.0, lead_s: float = 2.0
    ) -> None:
        self.maddr, self.run_id, self.seed = maddr, run_id, seed
        self.ttl_s, self.lead_s = ttl_s, lead_s
        self.ahead = 12
        self.net: Any = None
        self.sender: Sender = None  # type: ignore[assignment]  # set by start()
        self._count = 0
        self._ready: asyncio.Queue[tuple[Identity, float]] = asyncio.Queue()
        self._live: dict[str, tuple[Identity, float]] = {}  # peer id -> (key, last announced)
        self._task: asyncio.Task | None = None

    async def start(self) -> AnnouncedMembers:
        from hivemind.p2p import PeerID

        from p2pfm.daemon.config import NetConfig
        from p2pfm.daemon.net import PeerNetwork

        config = NetConfig(initial_peers=(self.maddr,), announce_ttl_s=self.ttl_s, heartbeat_s=self.ttl_s / 4)
        self.net = PeerNetwork(config, self._key(), self.run_id)
        await self.net.start()
        target = PeerID.from_base58(self.maddr.rsplit("/p2p/", 1)[1])
        self.sender = LibP2PSender(self.net.p2p, target, self.run_id)
        self._task = asyncio.create_task(self._refresh())
        return self

    def _key(self) -> Identity:
        self._count += 1
        return Identity.from_private_bytes(digest(f"p2pfm-fuzz-member/{self.seed}/{self._count}".encode()))

    async def _announce(self, key: Identity) -> None:
        now = time.time()
        payload = {"libp2p_id": self.net.libp2p_id, "maddrs": self.net.maddrs[:16], "round": 0,
                   "model_hash": bytes(32), "device_class": "fuzz", "power_w": 0.0, "state_bytes": 0}  # fmt: skip
        record = seal(key, kind="announce", run_id=self.run_id, round=0, seq=time.time_ns(), timestamp=now,
                      payload=payload)  # fmt: skip
        self._live[key.peer_id] = (key, now)
        with contextlib.suppress(Exception):  # a lost store is retried at the next refresh
            await asyncio.wait_for(
                self.net.dht.store(self.net.dht_key, record, expiration_time=now + self.ttl_s,
                                   subkey=key.peer_id, return_future=True),
                self.ttl_s / 2,
            )  # fmt: skip

    async def _refresh(self) -> None:
        while True:
            while self._ready.qsize() < self.ahead:
                key = self._key()
                await self._announce(key)
                await self._ready.put((key, time.time()))
            stale = time.time() - self.ttl_s / 4
            for key, announced in list(self._live.values()):
                if announced < stale:
                    await self._announce(key)
            await asyncio.sleep(0.2)

    async def next_key(self) -> Identity:
        key, announced = await self._ready.get()
        wait = announced + self.lead_s - time.time()
        if wait > 0:
            await asyncio.sleep(wait)
        return key

    def retire(self, key: Identity) -> None:
        self._live.pop(key.peer_id, None)  # not refreshed: its announcement expires within ttl_s

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self.net is not None:
            await self.net.shutdown()


# --- the campaign -------------------------------------------------------------------------------
MEMBER_GOSSIP_USES = 12  # messages per member key: under the update burst (40), and under a ban (50)
# even if several of them are outliers (severity 10) or round regressions (5)
MEMBER_REQUEST_USES = 3  # state/params requests per member key: the default request burst
STREAMS_PER_SENDER = 3  # under limits.max_streams_per_sender (4): a peer frees a slot just after it answers
CONTROL_OK = frozenset({"round_full"})  # a valid update the round has no room for: counted, not used


class Campaign:
    """Sends a :class:`MessageFactory`'s messages through fresh senders and tallies the answers.

    Transport-agnostic: ``new_sender`` makes a sender (a libp2p host, or in-memory streams in
    tests); ``members`` gives keys the target knows (None: its handlers check no membership, and
    controls use a sender of their own); ``problems`` reports crash evidence (process, log).
    """

    PIPELINE = 3  # batches in flight, each on its own sender

    def __init__(
        self,
        config: FuzzConfig,
        run_id: str,
        new_sender: SenderFactory,
        problems: Callable[[], list[str]] = list,
        progress: Callable[[int], None] | None = None,
        clock: Callable[[], float] = time.time,
        members: Members | None = None,
        round_source: Callable[[], int | None] = lambda: None,
    ) -> None:
        self.config = config
        self.run_id = run_id
        self.new_sender = new_sender
        self.problems = problems
        self.progress = progress
        self.clock = clock
        self.members = members
        self.round_source = round_source  # the target's round now (its status.json), if we can see it
        self.tally = Tally()
        self.budget = BAN_AFTER_REJECTIONS - 1  # invalid messages per sender: one short of a ban
        self._spare: asyncio.Queue[Sender | Exception] = asyncio.Queue()
        self._retired: list[asyncio.Task] = []
        self._starting: list[asyncio.Task] = []
        self._pause = 0.0  # seconds between batches while the target answers rate_limited
        self._slots: dict[int, asyncio.Semaphore] = {}
        self._uses = Counter[str]()

    async def run(self) -> Tally:
        config = self.config
        started = self.clock()
        if self.members is not None:
            control = self.members.sender
        else:
            control = await self.new_sender()
            self.tally.senders += 1
        try:
            info = await self._learn_target(control)
            factory = MessageFactory(
                config.seed, info, start=started, control_fraction=config.control_fraction
            )
            await self._rotate_member(factory)
            if config.ban_check and config.count >= 4 * BAN_AFTER_REJECTIONS:
                await self._ban_check(factory)
            await self._main(factory, control)
            await self._liveness(factory, control, final=True)
        finally:
            await self._shutdown(control)
        return self.tally

    async def _rotate_member(self, factory: MessageFactory) -> None:
        """A fresh member key, when the current one has used its budget (or there is none yet)."""
        if self.members is None:
            return
        if factory.member is not None:
            self.members.retire(factory.member)
        factory.member = await self.members.next_key()
        self._uses.clear()

    async def _note_use(self, factory: MessageFactory, message: FuzzMessage) -> None:
        if not message.member:
            return
        self._uses["gossip" if message.stream == "gossip" else "request"] += 1
        if self._uses["gossip"] >= MEMBER_GOSSIP_USES or self._uses["request"] >= MEMBER_REQUEST_USES:
            await self._rotate_member(factory)

    async def _learn_target(self, control: Sender) -> TargetInfo:
        """Ask for the target's parameters: model size and round come with the answer. (A key of its
        own: the factory's keys come from the seed.) With members, the first member key asks, again
        each second while the target has not read its announcement yet (``unknown_sender``)."""
        key = await self.members.next_key() if self.members is not None else Identity.generate()
        for _attempt in range(60):
            nonce, now = secrets.token_bytes(16), self.clock()
            data = seal(
                key, kind="state_request", run_id=self.run_id, round=0, seq=time.time_ns(),
                timestamp=now, payload={"round": 0, "nonce": nonce},
            )  # fmt: skip
            message = FuzzMessage(
                -1, "params", "control", "control.learn_target", frame_of(data), True, nonce=nonce
            )
            outcome = await self._send(control, message)
            if outcome.reason not in ("unknown_sender", "rate_limited"):
                break
            await asyncio.sleep(1.0)
        self.tally.add(message, outcome)
        if self.members is not None:
            self.members.retire(key)
        if outcome.verdict != "accepted" or not outcome.numel:
            raise RuntimeError(f"the target did not answer a valid parameter request: {outcome}")
        return TargetInfo(run_id=self.run_id, numel=int(outcome.numel), round=int(outcome.round or 0))

    async def _send(self, sender: Sender, message: FuzzMessage) -> Outcome:
        more = state_chunks if message.stream == "state" else (lambda _first: 0)
        async with self._slots.setdefault(id(sender), asyncio.Semaphore(STREAMS_PER_SENDER)):
            frames, error = await sender.exchange(message, self.config.timeout_s, more)
        return classify(message, frames, error, self.run_id, self.clock())

    async def _ban_check(self, factory: MessageFactory) -> None:
        """Garbage from one host until it is banned, and a little more: ``banned`` must come back."""
        sender = await self.new_sender()
        self.tally.senders += 1
        try:
            for i in range(BAN_AFTER_REJECTIONS + 5):
                data = b"\x01ban-check" + i.to_bytes(4, "big")
                message = FuzzMessage(-1 - i, STREAMS[i % 3], "ban_check", "ban_check.garbage",
                                      len(data).to_bytes(FRAME_HEADER, "big") + data, False)  # fmt: skip
                self.tally.add(message, await self._send(sender, message))
                self._tick(1)
        finally:
            self._slots.pop(id(sender), None)
            await sender.close()

    def _tick(self, n: int) -> None:
        if self.progress is not None:
            self.progress(n)

    async def _main(self, factory: MessageFactory, control: Sender) -> None:
        """Batches of one sender's budget, ``PIPELINE`` of them in flight (each on its own sender):
        while one waits for answers the next is generated and sent, and spare senders start."""
        config = self.config
        semaphore = asyncio.Semaphore(config.concurrency)
        next_check, generated = config.check_every, self.tally.tried
        in_flight: set[asyncio.Task] = set()
        self._top_up()
        while generated < config.count:
            now_round = self.round_source()
            if now_round is not None:
                factory.retarget(now_round)  # a training target moves on; our rounds follow it
            batch: list[FuzzMessage] = []
            invalid = 0
            while invalid < self.budget and generated + len(batch) < config.count:
                message = factory.next(self.clock())
                batch.append(message)
                invalid += not message.valid and not message.member
                await self._note_use(factory, message)
            generated += len(batch)
            sender = await self._spare.get()
            if isinstance(sender, Exception):
                raise RuntimeError(f"could not start a libp2p sender: {sender!r}") from sender
            self._top_up()
            in_flight.add(asyncio.create_task(self._batch(batch, sender, control, semaphore, factory)))
            if len(in_flight) >= self.PIPELINE:
                done, in_flight = await asyncio.wait(in_flight, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    task.result()  # a bug of ours stops the campaign
            if self._pause:
                self.tally.paced_s += self._pause
                await asyncio.sleep(self._pause)
            if generated >= next_check:
                next_check += config.check_every
                await asyncio.gather(*in_flight)
                in_flight.clear()
                await self._liveness(factory, control, final=False)
        await asyncio.gather(*in_flight)

    async def _batch(
        self,
        batch: list[FuzzMessage],
        sender: Sender,
        control: Sender,
        semaphore: asyncio.Semaphore,
        factory: MessageFactory,
    ) -> None:
        """Send one batch (member-signed messages on ``control``, the rest on ``sender``), tally it."""

        async def one(message: FuzzMessage) -> tuple[FuzzMessage, Outcome]:
            via = control if message.member or (message.valid and self.members is None) else sender
            async with semaphore:
                return message, await self._send(via, message)

        try:
            results = await asyncio.gather(*(one(m) for m in batch))
        finally:
            self._slots.pop(id(sender), None)
            self._retired.append(asyncio.create_task(sender.close()))
        paced = False
        for message, outcome in results:
            self.tally.add(message, outcome)
            if message.valid and outcome.verdict == "accepted":
                factory.delivered(message)  # only now may a replay of it be sent
            paced |= outcome.reason in PACING_REASONS
        self._tick(len(batch))
        # A rate limit: back off (doubling, at most 2 s between batches); none: full speed again.
        self._pause = min(max(self._pause * 2, 0.05), 2.0) if paced else 0.0

    def _top_up(self, ahead: int = 4) -> None:
        """Keep ``ahead`` fresh senders starting or ready: a host takes ~0.2 s to start."""
        self._starting = [t for t in self._starting if not t.done()]
        while self._spare.qsize() + len(self._starting) < ahead:

            async def start() -> None:
                try:
                    sender: Sender | Exception = await self.new_sender()
                    self.tally.senders += 1
                except Exception as exc:  # handed to the loop, which stops the campaign with it
                    sender = exc
                await self._spare.put(sender)

            self._starting.append(asyncio.create_task(start()))

    async def _liveness(self, factory: MessageFactory, control: Sender, *, final: bool) -> None:
        """The process and its log; one control per stream (a fresh member key); follow the round."""
        await self._rotate_member(factory)
        for stream in STREAMS:
            message = factory.next(self.clock(), stream=stream, control=True)
            outcome = await self._send(control, message)
            self.tally.add(message, outcome)
            if outcome.verdict == "accepted":
                factory.delivered(message)
                if outcome.round is not None and stream == "params":
                    factory.retarget(int(outcome.round))
            elif final and outcome.reason not in CONTROL_OK:
                self.tally.crashes.append(f"no answer to a valid {stream} control at the end: {outcome}")
        await self._rotate_member(factory)
        self.tally.crashes.extend(self.problems())

    async def _shutdown(self, control: Sender) -> None:
        # Let senders still starting finish, then close them: a cancelled start would orphan its p2pd.
        await asyncio.gather(*self._starting, return_exceptions=True)
        while not self._spare.empty():
            spare = self._spare.get_nowait()
            if not isinstance(spare, Exception):
                self._retired.append(asyncio.create_task(spare.close()))
        await asyncio.gather(*self._retired, return_exceptions=True)
        if self.members is not None:
            await self.members.close()
        else:
            await control.close()


def summary(tally: Tally, seconds: float, seed: int) -> dict[str, Any]:
    """The JSON object ``--json`` prints."""
    return {
        "tried": tally.tried,
        "accepted": tally.accepted,
        "rejected": dict(tally.rejected.most_common()),
        "ignored": dict(tally.ignored.most_common()),
        "dropped": dict(tally.dropped.most_common()),
        "accepted_invalid": tally.accepted_invalid,
        "crashes": len(tally.crashes),
        "crash_evidence": tally.crashes[:20],
        "controls": tally.controls,
        "controls_ok": tally.controls_ok,
        "controls_failed": dict(tally.controls_failed),
        "by_family": {k: dict(v.most_common()) for k, v in sorted(tally.by_family.items())},
        "examples": tally.examples,
        "senders": tally.senders,
        "paced_s": round(tally.paced_s, 2),
        "seconds": round(seconds, 2),
        "messages_per_s": round(tally.tried / seconds, 1) if seconds > 0 else math.nan,
        "seed": seed,
    }


def passed(result: dict[str, Any]) -> bool:
    """No crash, nothing invalid accepted, every control answered."""
    return (
        result["crashes"] == 0
        and result["accepted_invalid"] == 0
        and result["controls_ok"] == result["controls"]
    )


def format_report(result: dict[str, Any]) -> str:
    """The human table."""
    lines = [
        f"p2pfm bench fuzz: {result['tried']:,} messages in {result['seconds']:.1f} s "
        f"({result['messages_per_s']:.0f}/s, seed {result['seed']}, {result['senders']} libp2p senders)",
        "",
        f"{'outcome':<34}{'count':>10}",
    ]
    rows = [("accepted (controls)", result["accepted"])]
    rows += [(f"rejected: {r}", n) for r, n in result["rejected"].items()]
    rows += [(f"ignored: {r}", n) for r, n in result["ignored"].items()]
    rows += [(f"dropped: {r}", n) for r, n in result["dropped"].items()]
    lines += [f"{label:<34}{n:>10,}" for label, n in rows]
    lines += [
        "",
        f"accepted_invalid: {result['accepted_invalid']}   crashes: {result['crashes']}   "
        f"controls ok: {result['controls_ok']}/{result['controls']}",
    ]
    lines += [f"  crash: {c}" for c in result["crash_evidence"]]
    lines += [
        f"  {e['what']}: #{e['index']} {e['stream']} {e['case']} -> {e['outcome']}"
        for e in result["examples"]
    ]
    lines.append("PASS" if passed(result) else "FAIL")
    return "\n".join(lines)


async def _campaign_against(
    config: FuzzConfig,
    maddr: str,
    run_id: str,
    watch: TargetWatch,
    progress: bool,
    round_source: Callable[[], int | None] = lambda: None,
) -> Tally:
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=config.count, unit="msg", desc="fuzz", file=sys.stderr, leave=False)
    try:
        members = await AnnouncedMembers(maddr, run_id, config.seed).start()
        campaign = Campaign(
            config, run_id, lambda: LibP2PSender.start(maddr, run_id), watch.problems,
            progress=bar.update if bar is not None else None, members=members, round_source=round_source,
        )  # fmt: skip
        return await campaign.run()
    finally:
        if bar is not None:
            bar.close()


def run_fuzz(config: FuzzConfig, *, progress: bool = False) -> dict[str, Any]:
    """Run one campaign (launching the target unless ``config.target``); return :func:`summary`."""
    started = time.time()
    if config.target is not None:
        watch = TargetWatch(config.target_log)
        tally = asyncio.run(_campaign_against(config, config.target, str(config.run_id), watch, progress))
        return summary(tally, time.time() - started, config.seed)
    with contextlib.ExitStack() as stack:
        work_dir = config.work_dir or Path(
            stack.enter_context(tempfile.TemporaryDirectory(prefix="p2pfm-fuzz-"))
        )
        peer, maddr, run_id = launch_target(config, work_dir / "target")
        try:
            watch = TargetWatch(peer.log_path, peer.process)
            started = time.time()
            tally = asyncio.run(
                _campaign_against(config, maddr, run_id, watch, progress, lambda: peer.status().get("round"))
            )
            seconds = time.time() - started
            tally.crashes.extend(watch.problems())
        finally:
            watch.process = None  # from here on it exits because we asked it to
            code = peer.stop()
        if code not in (0, None):
            tally.crashes.append(f"target exited with status {code} when asked to leave")
        tally.crashes.extend(watch.problems())
        return summary(tally, seconds, config.seed)


def dump(result: dict[str, Any]) -> str:
    return json.dumps(result, indent=1, sort_keys=False)
