"""The network layer: hivemind's Kademlia DHT for discovery, its libp2p P2P for streams.

Discovery: every peer stores a *signed* announcement envelope under the run's DHT key, with
its p2pfm peer id as subkey and an expiration ``announce_ttl_s`` ahead, refreshed every
``heartbeat_s``. A record that expired means the peer is gone; a graceful leave overwrites
the record with an announcement that lists no addresses (a signed tombstone). Readers verify
every record (signature, run, kind, subkey == sender) and ignore anything else, so a
stranger cannot invent peers or redirect traffic; the announcement binds our Ed25519
identity to the libp2p peer id that our streams come from.

Streams: length-prefixed frames over libp2p binary streams, with the length checked against
a limit *before* reading the body. Every call has a deadline.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import Counter, OrderedDict
from collections.abc import Awaitable, Callable

from p2pfm.core.admission import Admission
from p2pfm.core.announce import Announcement, announcement_limits, check_announcement
from p2pfm.core.envelope import EnvelopeLimits, seal
from p2pfm.core.errors import Oversize, Refusal, Reject, RejectReason
from p2pfm.core.identity import Identity
from p2pfm.daemon.config import NetConfig

log = logging.getLogger(__name__)

FRAME_HEADER = 4  # big-endian u32 length


class FrameTooLarge(Oversize):
    """A peer announced a frame larger than we accept; the stream is dropped unread."""


WRITE_SLICE = 1 << 20  # bytes handed to the transport at once (see write_frame)


async def write_frame(writer: asyncio.StreamWriter, data: bytes) -> None:
    """One length-prefixed frame. A large frame goes to the transport ``WRITE_SLICE`` at a time,
    each drained before the next: asyncio's socket transport (3.11) copies whatever the socket
    did not take at once into its own buffer, so writing a 126 MB params answer in one call held
    a second copy of it until the asker had read it all."""
    writer.write(len(data).to_bytes(FRAME_HEADER, "big"))
    if len(data) <= WRITE_SLICE:
        writer.write(data)
    else:
        view = memoryview(data)
        for start in range(0, len(view), WRITE_SLICE):
            writer.write(view[start : start + WRITE_SLICE])
            await writer.drain()
    await writer.drain()


async def read_frame(
    reader: asyncio.StreamReader, max_bytes: int, reserve: Callable[[int], None] | None = None
) -> bytes:
    """One frame of at most ``max_bytes``; ``reserve(length)`` (which may refuse by raising) is
    called before the body is read, so memory budgets hold before anything is allocated."""
    header = await reader.readexactly(FRAME_HEADER)
    length = int.from_bytes(header, "big")
    # [REJECT] OVERSIZE: refuse before reading (or allocating) the body.
    if length > max_bytes:
        raise FrameTooLarge(f"frame of {length} bytes exceeds the limit of {max_bytes}")
    if reserve is not None:
        reserve(length)
    return await reader.readexactly(length)


class ForeignRecord(Reject):
    """A DHT record under the swarm's key that is not a well-formed announcement of its subkey.

    ``label`` is what the metrics count it under (the envelope's own reasons pass through)."""

    reason = RejectReason.SCHEMA

    def __init__(self, label: str, detail: str) -> None:
        super().__init__(detail)
        self.label = label


class IgnoredRecords:
    """Counts foreign or malformed DHT records by reason, and logs each offender at most once a minute.

    Lookups run every few seconds and a junk record stays until it expires: logging every
    sighting would flood the log (one stranger's 5,000 records made 10,000 lines per 10 s),
    and counting none would hide the attack. Memory is bounded: at most ``max_offenders``
    offenders are remembered for rate limiting (oldest forgotten first)."""

    LOG_EVERY_S = 60.0

    def __init__(self, max_offenders: int = 1024, what: str = "DHT record under") -> None:
        self.what = what
        self.by_reason: Counter[str] = Counter()
        self.max_offenders = max_offenders
        self._last_logged: OrderedDict[str, float] = OrderedDict()

    def note(self, subkey: object, exc: Refusal, now: float) -> None:
        label = getattr(exc, "label", exc.reason.value)
        self.by_reason[label] += 1
        offender = repr(subkey)[:80]
        last = self._last_logged.get(offender)
        if last is not None and now - last < self.LOG_EVERY_S:
            return
        self._last_logged[offender] = now
        self._last_logged.move_to_end(offender)
        while len(self._last_logged) > self.max_offenders:
            self._last_logged.popitem(last=False)
        log.info(
            "refused a %s %s: %s (%d refused in all; this offender is logged at most once a minute)",
            self.what,
            offender,
            exc,
            sum(self.by_reason.values()),
        )


async def _redial_in_dht_process(_dht, node, targets: list[tuple[str, list[str]]]) -> int:
    """Runs inside hivemind's DHT process: connect to each (libp2p id, maddrs) and ping it into
    the routing table. Returns how many answered. Module-level so that it can be pickled."""
    from hivemind.p2p import PeerID
    from hivemind.utils.multiaddr import Multiaddr

    answered = 0
    for libp2p_id, maddrs in targets:
        peer = PeerID.from_base58(libp2p_id)
        try:
            transport = [Multiaddr(m.split("/p2p/")[0]) for m in maddrs]  # connect() wants them without /p2p/
            await asyncio.wait_for(node.p2p._client.connect(peer, transport), 3.0)
            if await asyncio.wait_for(node.protocol.call_ping(peer), 3.0) is not None:
                answered += 1
        except Exception:  # unreachable still: try again at the next heartbeat
            continue
    return answered


def _p2pd_child(node):
    """The ``p2pd`` process hivemind started in the DHT process (an asyncio Process), or None."""
    return getattr(getattr(node, "p2p", None), "_child", None)


async def _exit_with_parent(_dht, node, parent_pid: int, poll_s: float = 1.0) -> None:
    """Runs inside hivemind's DHT process for its whole life: when the peer process that forked
    it dies (even by SIGKILL, which runs no clean-up), kill our ``p2pd`` and exit, so that a
    crashed or killed peer never leaves orphans running. Module-level so that it can be pickled."""
    while os.getppid() == parent_pid:
        await asyncio.sleep(poll_s)
    child = _p2pd_child(node)
    if child is not None and child.returncode is None:
        child.kill()
    os._exit(0)


async def _p2pd_pid(_dht, node) -> int:
    """Runs inside the DHT process: the pid of the ``p2pd`` it started (0 if none)."""
    child = _p2pd_child(node)
    return int(child.pid) if child is not None and child.returncode is None else 0


def _kill_if_p2pd(pid: int) -> None:
    """SIGKILL ``pid`` if it is still a p2pd (the pid could have been reused after it exited)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
            if b"p2pd" not in cmdline.read():
                return
        os.kill(pid, 9)
    except (OSError, ValueError):
        pass


StreamHandler = Callable[[str, asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


LEFTOVER_BYTES = 1 << 20  # what an asker may still be writing after we answered (a refused frame's body)


async def _drain_until_closed(reader: asyncio.StreamReader) -> None:
    """Wait until the asker closes, discarding at most ``LEFTOVER_BYTES`` it is still sending: a
    refusal sent while the asker writes a body we will not read would otherwise be lost in the
    reset that closing causes (wire.md: every refusal is answered)."""
    discarded = 0
    while discarded <= LEFTOVER_BYTES:
        chunk = await reader.read(65536)
        if not chunk:
            return
        discarded += len(chunk)


class PeerNetwork:
    """One peer's DHT + P2P endpoints. Create with :meth:`start` inside the daemon's event loop."""

    def __init__(
        self, config: NetConfig, identity: Identity, run_id: str, admission: Admission | None = None
    ) -> None:
        self.config = config
        self.identity = identity
        self.run_id = run_id
        self.admission = admission
        self.dht_key = f"p2pfm/{run_id}/peers"
        self.revocations_key = f"p2pfm/{run_id}/revoked"
        self.dht = None
        self.p2p = None
        self.libp2p_id = ""
        self.maddrs: list[str] = []
        self._announce_seq = 0
        self._limits = EnvelopeLimits(max_bytes=64 * 1024)
        self.ignored_records = IgnoredRecords()
        self._p2pd_pid = 0

    async def start(self) -> None:
        import hivemind  # heavy; imported only when a peer really starts

        loop = asyncio.get_running_loop()

        from p2pfm.daemon.dht_validator import AnnouncementValidator

        validator = AnnouncementValidator(
            self.run_id,
            self.dht_key,
            self.config.announce_ttl_s,
            self._limits,
            self.admission,
            self.revocations_key,
        )

        def create_dht() -> hivemind.DHT:
            return hivemind.DHT(
                initial_peers=list(self.config.initial_peers),
                host_maddrs=list(self.config.listen),
                announce_maddrs=list(self.config.announce) or None,
                record_validators=[validator],  # honest nodes refuse junk and overwrites at storage
                start=True,
            )

        try:
            self.dht = await loop.run_in_executor(None, create_dht)
        except Exception as exc:
            raise RuntimeError(
                f"could not start the DHT (listen={list(self.config.listen)}, "
                f"initial_peers={list(self.config.initial_peers)}): {exc}"
            ) from exc
        from functools import partial

        self.dht.run_coroutine(partial(_exit_with_parent, parent_pid=os.getpid()), return_future=True)
        try:
            self._p2pd_pid = int(
                await asyncio.wait_for(
                    self.dht.run_coroutine(_p2pd_pid, return_future=True), self.config.request_timeout_s
                )
            )
        except Exception as exc:  # only used to make sure nothing outlives us
            log.debug("could not learn the p2pd pid: %r", exc)
        self.p2p = await self.dht.replicate_p2p()
        self.libp2p_id = self.dht.peer_id.to_base58()
        self.maddrs = [str(m) for m in self.dht.get_visible_maddrs()]

    async def add_handler(self, name: str, handler: StreamHandler) -> None:
        """Serve ``name``; ``handler(remote libp2p id, reader, writer)``. Errors never escape."""

        async def wrapped(stream_info, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            remote = stream_info.peer_id.to_base58()
            try:
                await handler(remote, reader, writer)
                # The asker closes the stream once it has read our answer. Closing first, right
                # after the write, can make p2pd drop the answer still in flight (seen under load:
                # the asker read EOF instead of our reply and counted a failed push). Bounded: an
                # asker that never closes costs us at most request_timeout_s.
                await asyncio.wait_for(_drain_until_closed(reader), self.config.request_timeout_s)
            except (TimeoutError, asyncio.IncompleteReadError, ConnectionError) as exc:
                log.debug("stream %s from %s ended early: %r", name, remote, exc)
            except Exception:
                log.exception("handler %s failed on a stream from %s", name, remote)
            finally:
                writer.close()

        await self.p2p.add_binary_stream_handler(f"/p2pfm/{self.run_id}/{name}/1", wrapped)

    async def open_stream(
        self, libp2p_id: str, name: str
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        from hivemind.p2p import PeerID

        _, reader, writer = await self.p2p.call_binary_stream_handler(
            PeerID.from_base58(libp2p_id), f"/p2pfm/{self.run_id}/{name}/1"
        )
        return reader, writer

    # --- discovery -----------------------------------------------------------------
    async def announce(self, payload: dict, now: float) -> bool:
        """Store our signed announcement in the DHT for ``announce_ttl_s``."""
        if (
            self.dht is None or not self.dht.is_alive()
        ):  # e.g. Ctrl-C reached the DHT child first: nothing to tell
            return False
        self._announce_seq += 1
        record = seal(
            self.identity,
            kind="announce",
            run_id=self.run_id,
            round=payload["round"],
            seq=self._announce_seq,
            timestamp=now,
            payload=payload,
        )
        try:
            return bool(
                await asyncio.wait_for(
                    self.dht.store(
                        self.dht_key,
                        record,
                        expiration_time=now + self.config.announce_ttl_s,
                        subkey=self.identity.peer_id,
                        return_future=True,
                    ),
                    self.config.request_timeout_s,
                )
            )
        except Exception as exc:  # DHT hiccups (or a DHT child killed by Ctrl-C) must not stop us
            log.warning("announcement failed: %r", exc)
            return False

    async def lookup(self, now: float) -> dict[str, Announcement]:
        """Verified announcements of other peers found in the DHT now, tombstones included.

        A single lookup may miss records (Kademlia replicas answer with what they hold, and
        a loaded node may be skipped): callers merge lookups in a :class:`PeerBook`.
        """
        if self.dht is None or not self.dht.is_alive():
            return {}
        try:
            found = await asyncio.wait_for(
                self.dht.get(self.dht_key, latest=True, return_future=True), self.config.request_timeout_s
            )
        except Exception as exc:
            log.warning("peer lookup failed: %r", exc)
            return {}
        if found is None:
            return {}
        if not isinstance(found.value, dict):  # someone stored a plain value over the swarm's key
            self.ignored_records.note(
                self.dht_key, ForeignRecord("not_a_dictionary", "swarm key holds a plain value"), now
            )
            return {}
        peers: dict[str, Announcement] = {}
        for subkey, item in found.value.items():
            try:
                announcement = self.parse_announcement(subkey, item.value, now)
            except Reject as exc:
                self.ignored_records.note(subkey, exc, now)
                continue
            if announcement.peer_id != self.identity.peer_id:
                peers[announcement.peer_id] = announcement
        return peers

    def parse_announcement(self, subkey: object, record: object, now: float) -> Announcement:
        """One DHT record, checked by the core's rule (raises a Reject subclass)."""
        return check_announcement(
            subkey,
            record,
            run_id=self.run_id,
            now=now,
            limits=announcement_limits(self._limits, self.config.announce_ttl_s),
        )

    async def publish_revocations(self, data: bytes, serial: int, now: float) -> bool:
        """Store the authority's revocation list under the swarm's revocation key (serial as subkey)."""
        from p2pfm.daemon.dht_validator import REVOCATION_TTL_S

        if self.dht is None or not self.dht.is_alive():
            return False
        try:
            future = self.dht.store(
                self.revocations_key, data, expiration_time=now + REVOCATION_TTL_S, subkey=str(serial),
                return_future=True,
            )  # fmt: skip
            return bool(await asyncio.wait_for(future, self.config.request_timeout_s))
        except Exception as exc:
            log.info("publishing the revocation list failed: %r", exc)
            return False

    async def fetch_revocations(self) -> list[bytes]:
        """The revocation lists stored in the DHT (unchecked bytes; the admission policy reads them)."""
        if self.dht is None or not self.dht.is_alive():
            return []
        try:
            found = await asyncio.wait_for(
                self.dht.get(self.revocations_key, latest=True, return_future=True),
                self.config.request_timeout_s,
            )
        except Exception as exc:
            log.info("revocation lookup failed: %r", exc)
            return []
        if found is None or not isinstance(found.value, dict):
            return []
        return [item.value for item in list(found.value.values())[:64] if isinstance(item.value, bytes)]

    async def redial(self, targets: list[tuple[str, list[str]]]) -> int:
        """Reconnect the DHT to peers we knew but no longer see (e.g. after a network partition).

        Kademlia drops unreachable nodes from its routing table during a partition; when the
        link heals nothing would bring the two halves back together, so the daemon re-dials the
        addresses it remembers (from signed announcements) and the initial peers.
        """
        if not targets or self.dht is None or not self.dht.is_alive():
            return 0
        from functools import partial

        try:
            future = self.dht.run_coroutine(
                partial(_redial_in_dht_process, targets=targets), return_future=True
            )
            return int(await asyncio.wait_for(future, 3.0 * 2 * len(targets) + 2.0))
        except Exception as exc:
            log.debug("re-dial failed: %r", exc)
            return 0

    async def withdraw(self, payload: dict) -> None:
        """Graceful leave: replace our record with a signed tombstone (no addresses)."""
        await self.announce({**payload, "maddrs": []}, now=time.time())

    async def shutdown(self) -> None:
        """Stop our libp2p replica and the DHT child, each with a deadline (they may be dead already)."""
        try:
            if self.p2p is not None:
                await asyncio.wait_for(self.p2p.shutdown(), self.config.request_timeout_s)
        except Exception as exc:
            log.debug("p2p shutdown: %r", exc)
        if self.dht is not None:
            loop = asyncio.get_running_loop()
            try:
                await asyncio.wait_for(
                    loop.run_in_executor(None, self.dht.shutdown), self.config.request_timeout_s
                )
            except Exception as exc:
                log.debug("dht shutdown: %r", exc)
            if self.dht.is_alive():  # never leave an orphan that blocks interpreter exit
                self.dht.kill()
                self.dht.join(5)
        if self._p2pd_pid:  # the DHT child normally stops it; if the child died first, we do
            _kill_if_p2pd(self._p2pd_pid)
