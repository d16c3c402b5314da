"""The direct lane's sockets (:mod:`p2pfm.core.lane` has the why, the offer and the seal).

- :class:`LaneServer` (the donor): a TCP listener on the hosts of ``net.listen`` at
  ``net.state_lane_port``. Each state transfer that offers the lane registers a ticket
  (:meth:`LaneServer.offer`); a connection that sends a registered ticket within
  ``request_timeout_s`` is handed to that transfer, any other is closed and counted
  (``lane_refused``). At most ``MAX_GREETINGS`` connections wait for their ticket at once, and
  a ticket is good once, for one transfer, until that transfer ends.
- :func:`send_sealed` (the donor) and :func:`receive_sealed` (the joiner) move the sealed chunks
  with blocking sockets in a few dedicated threads: no event loop between the kernel and the
  file (on the stream that loop and the two ``p2pd`` daemons were most of the CPU a download took).
- :func:`open_lane` (the joiner): connect to one of the donor's hosts and send the ticket.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import socket
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

from p2pfm.core.lane import SEAL_BYTES, SECRET_BYTES, TICKET_BYTES, LaneCipher, LaneOffer, lane_ticket
from p2pfm.core.transfer import StateLayout
from p2pfm.daemon.snapshots import read_chunk
from p2pfm.daemon.statestream import PartialState, Progress, receive_pieces

log = logging.getLogger("p2pfm.peer")

MAX_GREETINGS = 16  # lane connections waiting for their ticket at once: more are closed unread
READ_AHEAD = 3  # sealed chunks the joiner's lane reader may hold beyond the checks in flight
CONNECT_TIMEOUT_S = 3.0  # per donor host tried (capped by the request timeout)
# Lane transfers run in these threads, not the loop's default pool (a 1.5 GB upload holds one for
# its whole length): two uploads (the handler's serving limit) and one download's reads.
_POOL = ThreadPoolExecutor(max_workers=4, thread_name_prefix="p2pfm-lane")


def _listen_hosts(listen: tuple[str, ...]) -> list[str]:
    """The IP hosts of our libp2p listen multiaddrs (``/ip4/H/tcp/..``, ``/ip6/H/tcp/..``), unspecified
    ones included: the lane listens where libp2p does, so it is exposed no further."""
    hosts: list[str] = []
    for maddr in listen:
        parts = maddr.split("/")
        if len(parts) >= 5 and parts[1] in ("ip4", "ip6") and parts[3] == "tcp" and parts[2] not in hosts:
            hosts.append(parts[2])
    return hosts


class LaneServer:
    """The donor's lane listener and its open offers."""

    def __init__(
        self, listen: tuple[str, ...], port: int, ticket_timeout_s: float, counters: Counter[str]
    ) -> None:
        self.listen, self.wanted_port, self.ticket_timeout_s = listen, port, ticket_timeout_s
        self.counters = counters
        self.port = 0
        self._sockets: list[socket.socket] = []
        self._tasks: set[asyncio.Task] = set()
        self._offers: dict[bytes, asyncio.Future[socket.socket]] = {}
        self._greetings = 0

    async def start(self) -> bool:
        """Listen on each listen host (the first's port for the rest); False if none would bind."""
        port = self.wanted_port
        for host in _listen_hosts(self.listen):
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            sock = socket.socket(family, socket.SOCK_STREAM)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.bind((host, port))
                sock.listen(64)
                sock.setblocking(False)
            except OSError as exc:
                sock.close()
                log.warning("state lane: cannot listen on %s port %d (%s)", host, port, exc)
                continue
            port = port or sock.getsockname()[1]
            self._sockets.append(sock)
            self._spawn(self._accept(sock))
        self.port = port if self._sockets else 0
        if self._sockets:
            log.info("state lane listening on port %d", self.port)
        return bool(self._sockets)

    def _spawn(self, coro) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _accept(self, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, _ = await loop.sock_accept(listener)
            except asyncio.CancelledError:
                raise
            except OSError as exc:  # e.g. out of descriptors: wait, do not spin
                log.info("state lane: accept failed: %r", exc)
                await asyncio.sleep(1.0)
                continue
            if self._greetings >= MAX_GREETINGS:
                self.counters["lane_refused"] += 1
                conn.close()
                continue
            self._greetings += 1
            self._spawn(self._greet(conn))

    async def _greet(self, conn: socket.socket) -> None:
        """Read the ticket (exactly ``TICKET_BYTES``, within the timeout) and hand the connection
        to its transfer; close anything else."""
        loop = asyncio.get_running_loop()
        handed = False
        try:
            conn.setblocking(False)
            ticket = bytearray()
            async with asyncio.timeout(self.ticket_timeout_s):
                while len(ticket) < TICKET_BYTES:
                    data = await loop.sock_recv(conn, TICKET_BYTES - len(ticket))
                    if not data:
                        break
                    ticket += data
            waiter = self._offers.pop(bytes(ticket), None)
            if waiter is None or waiter.done():
                self.counters["lane_refused"] += 1
                return
            waiter.set_result(conn)
            handed = True
        except (OSError, TimeoutError):
            self.counters["lane_refused"] += 1
        finally:
            self._greetings -= 1
            if not handed:
                conn.close()

    def offer(self) -> tuple[LaneOffer, asyncio.Future[socket.socket]]:
        """A fresh offer for one transfer, and the future its connection arrives on."""
        offer = LaneOffer(port=self.port, secret=secrets.token_bytes(SECRET_BYTES))
        waiter: asyncio.Future[socket.socket] = asyncio.get_running_loop().create_future()
        self._offers[lane_ticket(offer.secret)] = waiter
        return offer, waiter

    def withdraw(self, offer: LaneOffer, waiter: asyncio.Future[socket.socket]) -> None:
        """The transfer is over: its ticket no longer opens anything, and a connection that came
        for it is closed (a no-op if the transfer used and closed it already)."""
        self._offers.pop(lane_ticket(offer.secret), None)
        if not waiter.done():
            waiter.cancel()
        elif not waiter.cancelled() and waiter.exception() is None:
            waiter.result().close()

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for sock in self._sockets:
            sock.close()
        self._sockets.clear()
        for waiter in self._offers.values():
            if not waiter.done():
                waiter.cancel()
        self._offers.clear()


# --- the donor's side --------------------------------------------------------------------------
def _send_sealed_blocking(
    sock: socket.socket,
    fd: int,
    layout: StateLayout,
    indexes: list[int],
    cipher: LaneCipher,
    stall_s: float,
    rate_bps: float,
    stop: threading.Event,
) -> int:
    sock.setblocking(True)
    sock.settimeout(stall_s)  # sendall: the whole chunk must leave within stall_s (Python >= 3.5)
    sent, started = 0, time.monotonic()
    for index in indexes:
        if stop.is_set():
            break
        piece = read_chunk(fd, layout, index)
        sock.sendall(cipher.seal_chunk(index, piece))
        sent += len(piece)
        if rate_bps > 0:
            ahead = started + sent / rate_bps - time.monotonic()
            if ahead > 0 and stop.wait(ahead):
                break
    return sent


async def _in_lane_thread(sock: socket.socket, func, *args):
    """Run ``func(*args, stop)`` in a lane thread; if we are cancelled (a deadline), shut the socket
    so the thread's blocking call returns, and wait for it: nothing it uses may close under it."""
    loop = asyncio.get_running_loop()
    stop = threading.Event()
    job = loop.run_in_executor(_POOL, func, *args, stop)
    try:
        return await asyncio.shield(job)
    finally:
        if not job.done():
            stop.set()
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            await asyncio.wait({job})
            if not job.cancelled():
                job.exception()  # retrieved: it is the cancellation's consequence, not news


async def send_sealed(
    sock: socket.socket,
    fd: int,
    layout: StateLayout,
    indexes: list[int],
    offer: LaneOffer,
    *,
    stall_s: float,
    rate_bps: float = 0.0,
) -> int:
    """Send chunks ``indexes`` of the snapshot open as ``fd``, each sealed, over the lane ``sock``
    (closed after); returns the chunk bytes sent. Same stall and rate rules as on the stream."""
    try:
        return await _in_lane_thread(
            sock,
            _send_sealed_blocking,
            sock,
            fd,
            layout,
            indexes,
            LaneCipher(offer.secret),
            stall_s,
            rate_bps,
        )
    finally:
        sock.close()


# --- the joiner's side -------------------------------------------------------------------------
async def open_lane(hosts: list[str], offer: LaneOffer, timeout_s: float) -> socket.socket | None:
    """A lane to the donor: the first of ``hosts`` that accepts at the offered port, with our
    ticket sent; None if none does (the chunks then come over the stream)."""
    loop = asyncio.get_running_loop()
    for host in hosts:
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            async with asyncio.timeout(min(CONNECT_TIMEOUT_S, timeout_s)):
                await loop.sock_connect(sock, (host, offer.port))
                await loop.sock_sendall(sock, lane_ticket(offer.secret))
            return sock
        except (OSError, TimeoutError) as exc:
            log.info("state lane to %s port %d: %r", host, offer.port, exc)
            sock.close()
    return None


def _recv_exact_blocking(
    sock: socket.socket, length: int, stall_s: float, stop: threading.Event
) -> bytearray:
    """Exactly ``length`` bytes (a sealed chunk: its size is the manifest's, nothing the donor
    says); all of them within ``stall_s``."""
    buffer = bytearray(length)
    view, got = memoryview(buffer), 0
    deadline = time.monotonic() + stall_s
    sock.setblocking(True)
    while got < length:
        if stop.is_set():
            raise ConnectionError("state lane closed")
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"state lane: no whole chunk within {stall_s:.0f} s")
        sock.settimeout(remaining)
        count = sock.recv_into(view[got:])
        if count == 0:
            raise ConnectionError(f"state lane closed after {got} of {length} bytes of a chunk")
        got += count
    return buffer


async def receive_sealed(
    sock: socket.socket,
    partial: PartialState,
    indexes: list[int],
    progress: Progress,
    offer: LaneOffer,
    *,
    stall_s: float,
) -> None:
    """Read chunks ``indexes`` (in order) from the lane into ``partial``: each exactly its sealed
    length, opened (:class:`~p2pfm.core.lane.LaneSealBroken` on a bad tag), then checked and
    written as on the stream (:func:`~p2pfm.daemon.statestream.receive_pieces`). Closes ``sock``.

    One thread reads the socket without pause, up to ``READ_AHEAD`` sealed chunks ahead of the
    checks (asking the loop for each read left the socket idle between chunks: the donor stalled
    on a full buffer while our loop woke up)."""
    manifest = partial.manifest
    assert manifest is not None
    cipher = LaneCipher(offer.secret)
    loop = asyncio.get_running_loop()
    arrived: asyncio.Queue[bytearray | BaseException] = asyncio.Queue()
    room = threading.Semaphore(READ_AHEAD)  # sealed chunks read and not yet taken

    def read_all(stop: threading.Event) -> None:
        for index in indexes:
            while not room.acquire(timeout=0.5):
                if stop.is_set():
                    return
            if stop.is_set():
                return
            try:
                item: bytearray | BaseException = _recv_exact_blocking(
                    sock, manifest.chunk_length(index) + SEAL_BYTES, stall_s, stop
                )
            except BaseException as exc:  # noqa: BLE001 - handed to the loop, raised there
                item = exc
            loop.call_soon_threadsafe(arrived.put_nowait, item)
            if isinstance(item, BaseException):
                return

    async def next_piece(index: int) -> bytearray:
        item = await arrived.get()
        room.release()
        if isinstance(item, BaseException):
            raise item
        return item

    def write(index: int, sealed: bytes | bytearray) -> None:
        partial.write_chunk(index, cipher.open_chunk(index, sealed))

    reading = asyncio.ensure_future(_in_lane_thread(sock, read_all))
    try:
        await receive_pieces(next_piece, write, partial, indexes, progress)
    finally:
        reading.cancel()  # stops the reader thread (socket shut) and waits for it, if it still runs
        await asyncio.gather(reading, return_exceptions=True)
        sock.close()
