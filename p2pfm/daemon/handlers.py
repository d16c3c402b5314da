"""The peer's network side: stream handlers that answer others, and the calls we make to them.

Each handler reads one bounded frame, hands the bytes to the protocol object, and writes what
it decides: an answer, or a refusal map ``{"ok": false, "reason"}`` (``protocols/wire.md``,
"Streams and refusals"). Each call opens a stream with a deadline, sends a request sealed by
the protocol, and checks the answer with the protocol's rules. No rule lives here.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import socket
import time
from collections import Counter
from collections.abc import Awaitable, Callable

import msgpack
import numpy as np

from p2pfm.core.announce import Announcement
from p2pfm.core.envelope import Envelope
from p2pfm.core.errors import RateLimited, Refusal
from p2pfm.core.lane import VIA_FRAME_BYTES, LaneOffer, LaneSealBroken, lane_hosts, parse_via, via_frame
from p2pfm.core.transfer import Donor, Manifest, StateLayout, params_answer_limit
from p2pfm.daemon.lanes import LaneServer, open_lane, receive_sealed, send_sealed
from p2pfm.daemon.net import IgnoredRecords, read_frame, write_frame
from p2pfm.daemon.runtime import PeerRuntime
from p2pfm.daemon.statestream import PartialState, Progress, receive_chunks, send_chunks

log = logging.getLogger("p2pfm.peer")

REQUEST_FRAME_BYTES = 4096  # a state request is ~200 bytes
MANIFEST_FRAME_BYTES = 4 << 20  # 65,536 chunk hashes of 32 bytes plus the envelope


class Refused(Exception):
    """The peer we asked refused our request and said why (its reason, from our request's checks)."""


def raise_if_refused(frame: bytes, what: str) -> None:
    """Answers are envelopes (msgpack arrays); a refusal is a small map ``{"ok": False, "reason"}``."""
    if len(frame) > 256:
        return
    try:
        answer = msgpack.unpackb(frame)
    except Exception:  # not a refusal; the envelope checks will name what it is
        return
    if isinstance(answer, dict) and answer.get("ok") is False:
        raise Refused(f"{what} refused by the peer: {str(answer.get('reason'))[:64]}")


class StreamBudget:
    """Bounds on what others' streams may hold at once: streams per transport and bytes in all.

    Without them parallel 60 MiB frames each added ~59 MB, with no total cap. A stream over
    either budget is refused (``rate_limited``) before its body is read.
    """

    def __init__(self, max_streams_per_sender: int, max_inflight_bytes: int) -> None:
        self.max_streams = max_streams_per_sender
        self.max_bytes = max_inflight_bytes
        self.streams: Counter[str] = Counter()
        self.bytes = 0

    def open(self, remote: str) -> list[int]:
        """Take one stream slot of ``remote`` (RateLimited beyond the cap); returns its byte tally."""
        if self.streams[remote] >= self.max_streams:
            raise RateLimited(f"{remote} already has {self.streams[remote]} streams open with us")
        self.streams[remote] += 1
        return [0]

    def close(self, remote: str, held: list[int]) -> None:
        self.bytes -= held[0]
        self.streams[remote] -= 1
        if self.streams[remote] <= 0:
            del self.streams[remote]

    def reserver(self, held: list[int]) -> Callable[[int], None]:
        """``read_frame``'s ``reserve``: counts a frame's bytes against the total before it is read."""

        def reserve(length: int) -> None:
            if self.bytes + length > self.max_bytes:
                raise RateLimited(
                    f"{self.bytes} bytes of others' frames in flight; {length} more would pass the cap"
                )
            self.bytes += length
            held[0] += length

        return reserve


class StreamHandlers:
    """Answers the ``gossip``, ``state`` and ``params`` streams of other peers."""

    def __init__(self, runtime: PeerRuntime) -> None:
        self.rt = runtime
        self.protocol = runtime.protocol
        limits = runtime.config.limits
        self.budget = StreamBudget(limits.max_streams_per_sender, limits.max_inflight_bytes)
        self.serving_state = asyncio.Semaphore(2)  # full-state uploads at once: the rest are refused
        self.refusals = IgnoredRecords(what="message from libp2p peer")  # logs each offender once a minute

    async def install(self) -> None:
        net = self.rt.config.net
        if net.state_lane_port >= 0:
            lanes = LaneServer(net.listen, net.state_lane_port, net.request_timeout_s, self.rt.counters)
            if await lanes.start():
                self.rt.lanes = lanes
        await self.rt.net.add_handler("gossip", self.handle_gossip)
        await self.rt.net.add_handler("state", self.handle_state)
        await self.rt.net.add_handler("params", self.handle_params)

    async def close(self) -> None:
        """Stop serving the lane (the libp2p handlers go with the network)."""
        if self.rt.lanes is not None:
            await self.rt.lanes.close()
            self.rt.lanes = None

    async def _refuse(
        self, remote: str, writer: asyncio.StreamWriter, exc: Refusal, *, counted: bool
    ) -> None:
        """Count a refusal (unless the protocol already did) and tell the asker why."""
        if not counted:
            self.protocol.refused(remote, exc, time.time())
        for sender, reason, length in self.protocol.scores.take_decisions():
            log.warning(
                "banned %s for %.0f s: too many rejected messages (the last: %s)", sender, length, reason
            )
        self.refusals.note(remote, exc, time.time())
        await write_frame(writer, msgpack.packb({"ok": False, "reason": exc.reason.value}))

    async def _read_request(
        self,
        remote: str,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        limit: int,
        timeout: float,
        held: list[int],
    ) -> bytes | None:
        try:
            return await asyncio.wait_for(read_frame(reader, limit, self.budget.reserver(held)), timeout)
        except Refusal as exc:  # over the size limit or the byte budget: refused before the body is read
            await self._refuse(remote, writer, exc, counted=False)
            return None

    async def _with_slot(
        self, remote: str, writer: asyncio.StreamWriter, body: Callable[[list[int]], Awaitable[None]]
    ) -> None:
        """Run ``body`` holding a stream slot of ``remote``; a banned transport, or one over its
        stream budget, gets its refusal at once, unread."""
        try:
            self.protocol.check_sender(remote, time.time())
            held = self.budget.open(remote)
        except Refusal as exc:
            if isinstance(exc, RateLimited):
                self.protocol.refused(remote, exc, time.time())
            await write_frame(writer, msgpack.packb({"ok": False, "reason": exc.reason.value}))
            return
        try:
            await body(held)
        finally:
            self.budget.close(remote, held)

    async def handle_gossip(
        self, remote: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        await self._with_slot(remote, writer, lambda held: self._gossip(remote, reader, writer, held))

    async def handle_state(
        self, remote: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        await self._with_slot(remote, writer, lambda held: self._state(remote, reader, writer, held))

    async def handle_params(
        self, remote: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        await self._with_slot(remote, writer, lambda held: self._params(remote, reader, writer, held))

    async def _gossip(
        self, remote: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, held: list[int]
    ) -> None:
        net = self.rt.config.net
        data = await self._read_request(
            remote, reader, writer, net.max_message_bytes, net.request_timeout_s * 4, held
        )
        if data is None:
            return
        self.rt.counters["bytes_received"] += len(data)
        start = time.perf_counter()
        refusal: Refusal | None = None
        try:
            self.protocol.receive_update(remote, data, time.time())
        except Refusal as exc:
            refusal = exc
        self.rt.counters["receive_seconds"] += time.perf_counter() - start
        if refusal is not None:
            await self._refuse(remote, writer, refusal, counted=True)
            return
        self.rt.heard_update.set()
        await write_frame(writer, msgpack.packb({"ok": True}))

    async def _open_request(
        self,
        remote: str,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        stream: str,
        held: list[int],
    ) -> Envelope | None:
        """A state/params request: bounded read, then the protocol's checks (envelope, kind,
        membership, rate); None once refused (answered)."""
        timeout = self.rt.config.net.request_timeout_s
        data = await self._read_request(remote, reader, writer, REQUEST_FRAME_BYTES, timeout, held)
        if data is None:
            return None
        try:
            return self.protocol.open_request(remote, data, time.time(), stream=stream)
        except Refusal as exc:
            await self._refuse(remote, writer, exc, counted=True)
            return None

    async def _state(
        self, remote: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, held: list[int]
    ) -> None:
        """Serve our snapshot to a member: a signed manifest, then the chunks it wants, read one
        at a time from the snapshot's file (held open: a round that moves on meanwhile writes a
        new file and leaves this transfer its own)."""
        request = await self._open_request(remote, reader, writer, "state", held)
        if request is None:
            return
        if self.serving_state.locked():
            busy = RateLimited("already serving our state to two peers")
            await self._refuse(remote, writer, busy, counted=False)
            return
        async with self.serving_state:
            net = self.rt.config.net
            try:  # the newest snapshot with its file, atomically: a round may write one meanwhile
                snapshot, fd = self.rt.snapshots.open_latest()
            except FileNotFoundError:
                await self._refuse(remote, writer, RateLimited("no state to serve yet"), counted=False)
                return
            try:
                assert snapshot.layout is not None  # every written snapshot has one
                lane = self.rt.lanes.offer() if self.rt.lanes is not None else None
                try:
                    manifest, indexes, offered = self.protocol.serve_layout(
                        request, snapshot.layout, snapshot.round, time.time(),
                        lane=None if lane is None else lane[0],
                    )  # fmt: skip
                except Refusal as exc:  # a want that is no honest joiner's
                    await self._refuse(remote, writer, exc, counted=False)
                    return
                async with asyncio.timeout(net.state_deadline_s(snapshot.size)):
                    await asyncio.wait_for(write_frame(writer, manifest), net.state_stall_s)
                    sent = await self._send_state(
                        remote, reader, writer, fd, snapshot.layout, indexes,
                        lane if offered is not None else None,
                    )  # fmt: skip
            finally:
                if lane is not None and self.rt.lanes is not None:
                    self.rt.lanes.withdraw(*lane)
                self.rt.snapshots.release(fd)
            self.rt.counters["state_bytes_served"] += sent
            self.rt.counters["bytes_sent"] += sent

    async def _send_state(
        self,
        remote: str,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        fd: int,
        layout: StateLayout,
        indexes: list[int],
        lane: tuple[LaneOffer, asyncio.Future[socket.socket]] | None,
    ) -> int:
        """The chunks after the manifest: over the lane if we offered one and the joiner says it
        connected (its ``{"via": ...}`` frame), else over this stream; returns the bytes sent."""
        net = self.rt.config.net
        if lane is not None:
            offer, waiter = lane
            try:
                via = parse_via(
                    await asyncio.wait_for(read_frame(reader, VIA_FRAME_BYTES), net.state_stall_s)
                )
            except Refusal as exc:
                await self._refuse(remote, writer, exc, counted=False)
                return 0
            if via == "lane":
                sock = await asyncio.wait_for(waiter, net.state_stall_s)
                self.rt.counters["state_lane_uploads"] += 1
                return await send_sealed(
                    sock,
                    fd,
                    layout,
                    indexes,
                    offer,
                    stall_s=net.state_stall_s,
                    rate_bps=net.state_serve_rate_bps,
                )
        return await send_chunks(
            writer, fd, layout, indexes, stall_s=net.state_stall_s, rate_bps=net.state_serve_rate_bps
        )

    async def _params(
        self, remote: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, held: list[int]
    ) -> None:
        """Serve our parameters to a member's consensus pull: ``sync_codec`` of (params - initial), signed."""
        request = await self._open_request(remote, reader, writer, "params", held)
        if request is None:
            return
        loop = asyncio.get_running_loop()
        # serve_params drops the initial parameters' pages block by block as it reads them
        # (PeerProtocol.initial_read, set by the daemon): nothing to release afterwards.
        message = await loop.run_in_executor(None, self.protocol.serve_params, request, time.time())
        await write_frame(writer, message)
        self.rt.counters["bytes_sent"] += len(message)
        self.rt.counters["sync_bytes_sent"] += len(message)


class LaneFailed(ConnectionError):
    """The direct lane broke mid-transfer; the verified chunks stay, the rest come over the stream."""


class StreamClient:
    """Our calls to other peers: push an update, pull parameters, download state."""

    def __init__(self, runtime: PeerRuntime) -> None:
        self.rt = runtime
        self.protocol = runtime.protocol
        self._partial: PartialState | None = None  # the state download in progress, kept across donors
        self.last_download: Progress | None = None

    async def push_update(self, target: Announcement, message: bytes) -> None:
        net = self.rt.config.net
        try:
            reader, writer = await asyncio.wait_for(
                self.rt.net.open_stream(target.libp2p_id, "gossip"), net.request_timeout_s
            )
            try:
                await asyncio.wait_for(write_frame(writer, message), net.request_timeout_s)
                reply = await asyncio.wait_for(read_frame(reader, 1024), net.request_timeout_s)
            finally:
                writer.close()
            self.rt.counters["bytes_sent"] += len(message)
            self.rt.counters["update_bytes_sent"] += len(message)
            answer = msgpack.unpackb(reply)
            if not answer.get("ok"):
                log.info("peer %s refused our update: %s", target.peer_id, answer.get("reason"))
        except Exception as exc:  # timeouts, dead peers, resets: never our compute's problem
            self.rt.counters["push_failures"] += 1
            self.rt.book.suspect(target.peer_id)
            log.info("push to %s failed: %r", target.peer_id, exc)

    async def pull_params(self, donor: Announcement) -> tuple[np.ndarray, int]:
        """A live peer's parameters (decoded against the shared initial weights) and its round."""
        net = self.rt.config.net
        limit = params_answer_limit(self.protocol.learner.numel, net.max_message_bytes)
        # The answer scales with the model (~126 MB at 124M parameters): so does its deadline.
        timeout = net.request_timeout_s * 2 + limit / net.state_min_rate_bps
        reader, writer = await asyncio.wait_for(self.rt.net.open_stream(donor.libp2p_id, "params"), timeout)
        try:
            nonce = secrets.token_bytes(16)
            await write_frame(writer, self.protocol.state_request(nonce, time.time()))
            data = await asyncio.wait_for(read_frame(reader, limit), timeout)
        finally:
            writer.close()
        self.rt.counters["bytes_received"] += len(data)
        raise_if_refused(data, "parameter sync")
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(
                None, self.protocol.open_params, data, donor.public_key, nonce, time.time()
            )
        except Refusal as exc:
            self.protocol.refused(donor.peer_id, exc, time.time())  # a bad answer counts against the donor
            raise

    async def download_state(self, donor: Announcement) -> tuple[dict[str, np.ndarray], int]:
        """Fetch and verify a donor's snapshot into our partial file, resuming what earlier donors
        sent (:mod:`p2pfm.daemon.statestream`); raise on any mismatch, stall or deadline. The
        arrays are views of the downloaded file; :attr:`last_download` has the figures."""
        claim = Donor(public_key=donor.public_key, round=donor.round, model_hash=donor.model_hash)
        partial = self.partial()
        progress = Progress(donor=donor.peer_id, reused=partial.verified_bytes())
        started = time.perf_counter()
        lane = self.rt.config.net.state_lane_port >= 0  # ask for the direct lane (p2pfm.core.lane)
        try:
            want = partial.want_for(donor.model_hash)
            while True:
                progress.attempts += 1
                try:
                    retry = await self._fetch(donor, claim, want, progress, lane=lane)
                except LaneFailed as exc:
                    # the lane broke (path, firewall, or a bad seal): keep the verified chunks and
                    # ask this donor again for the rest over the stream, once
                    self.rt.counters["state_lane_failures"] += 1
                    log.info(
                        "state lane from %s failed (%s): the rest over the libp2p stream", donor.peer_id, exc
                    )
                    lane, progress.via = False, "lane+stream"
                    retry = partial.want_for(progress.model_hash)
                if retry is None and not partial.missing():
                    break
                want = retry  # the donor's manifest lists chunks we hold: ask again for the rest only
        except Refusal as exc:
            # a bad manifest, chunk or state counts against the donor
            self.protocol.refused(donor.peer_id, exc, time.time())
            raise
        finally:
            progress.seconds = time.perf_counter() - started
            self.rt.counters["state_bytes_downloaded"] += progress.fetched
            self.rt.counters["bytes_received"] += progress.fetched
            self.last_download = progress
        loop = asyncio.get_running_loop()
        try:
            result = await loop.run_in_executor(None, partial.open_state, self.protocol.open_state_buffer)
        except Refusal as exc:
            self.protocol.refused(donor.peer_id, exc, time.time())
            raise
        progress.reused = partial.verified_bytes() - progress.fetched
        log.info(
            "downloaded the state of round %d from %s: %d bytes fetched in %.1f s (%.1f MB/s), %d reused",
            result[1], donor.peer_id, progress.fetched, progress.seconds, progress.rate_bps / 1e6, progress.reused,
        )  # fmt: skip
        return result

    async def _fetch(
        self, donor: Announcement, claim: Donor, want: dict | None, progress: Progress, *, lane: bool
    ) -> dict | None:
        """One stream: request, manifest, chunks (over the lane the manifest offers, if ``lane``
        and we reach it; :class:`LaneFailed` if it breaks). Returns a ``want`` to ask again with
        when the manifest is of another state than ``want`` named and we already hold some of
        its chunks."""
        net = self.rt.config.net
        partial = self.partial()
        loop = asyncio.get_running_loop()
        reader, writer = await asyncio.wait_for(
            self.rt.net.open_stream(donor.libp2p_id, "state"), net.request_timeout_s * 2
        )
        try:
            async with asyncio.timeout(net.state_stall_s * 2) as deadline:
                request = self.protocol.state_request(secrets.token_bytes(16), time.time(), want, lane=lane)
                await write_frame(writer, request)
                first = await asyncio.wait_for(read_frame(reader, MANIFEST_FRAME_BYTES), net.state_stall_s)
                raise_if_refused(first, "state download")
                manifest = self.protocol.open_manifest(first, claim, time.time())
                deadline.reschedule(loop.time() + net.state_deadline_s(manifest.total_bytes))
                await loop.run_in_executor(None, partial.take_manifest, manifest)
                if want is not None and want["model_hash"] == manifest.model_hash:
                    indexes = [i for start, stop in want["ranges"] for i in range(start, stop)]
                else:  # the donor sends every chunk
                    if partial.verified and progress.attempts == 1:
                        if manifest.lane is not None:  # it waits for our word on the lane first
                            await write_frame(writer, via_frame("stream"))
                        return partial.want_for(manifest.model_hash)
                    indexes = list(range(len(manifest.chunk_hashes)))
                progress.total_bytes, progress.model_hash = manifest.total_bytes, manifest.model_hash
                await self._receive(donor, reader, writer, manifest, indexes, progress)
        finally:
            writer.close()
        if partial.missing():
            raise ConnectionError(f"donor's stream ended with {len(partial.missing())} chunks missing")
        return None

    async def _receive(
        self,
        donor: Announcement,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        manifest: Manifest,
        indexes: list[int],
        progress: Progress,
    ) -> None:
        """The chunks after the manifest: over its lane if it offers one and we reach the donor
        there (we tell it which way on the stream), else over the stream."""
        net = self.rt.config.net
        partial = self.partial()
        if manifest.lane is None or not indexes:
            if manifest.lane is not None:
                await write_frame(writer, via_frame("stream"))
            await receive_chunks(reader, partial, indexes, progress, stall_s=net.state_stall_s)
            return
        sock = await open_lane(lane_hosts(donor.maddrs), manifest.lane, net.request_timeout_s)
        if sock is None:
            self.rt.counters["state_lane_unreachable"] += 1
            await write_frame(writer, via_frame("stream"))
            await receive_chunks(reader, partial, indexes, progress, stall_s=net.state_stall_s)
            return
        progress.via = "lane"
        try:
            await write_frame(writer, via_frame("lane"))
            await receive_sealed(sock, partial, indexes, progress, manifest.lane, stall_s=net.state_stall_s)
        except LaneSealBroken as exc:
            self.rt.counters["state_lane_seal_broken"] += 1
            raise LaneFailed(str(exc)) from exc
        except (OSError, TimeoutError) as exc:  # the lane (or the stream we spoke on) broke
            raise LaneFailed(repr(exc)) from exc
        finally:
            sock.close()

    def partial(self) -> PartialState:
        if self._partial is None:
            self._partial = PartialState(self.rt.config.work_dir / "transfer")
        return self._partial
