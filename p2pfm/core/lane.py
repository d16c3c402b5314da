"""The state download's direct lane: chunks over a plain TCP connection, sealed with AES-GCM.

Why: a state download over libp2p goes Python -> ``p2pd`` (noise, yamux) -> TCP -> ``p2pd`` ->
Python. At 124M parameters the two daemons alone took 4-4.5 CPU seconds per 1.5 GB and the
stream reached 8-9 % of a plain TCP copy on two cores; a download is the one transfer big enough
for that to matter. So the libp2p stream stays the control plane (the signed request and the
signed manifest, and everything a stranger could send), and the bytes may take a side lane:

1. the joiner's ``state_request`` says ``lane: true``;
2. the donor's signed manifest offers ``lane: {"port", "secret"}``: a TCP port it listens on and
   32 random bytes for this one transfer. The manifest travels on the encrypted, authenticated
   libp2p stream, so only the joiner learns the secret;
3. the joiner connects to one of the donor's announced hosts (:func:`lane_hosts`) at that port,
   sends the 32-byte :func:`lane_ticket` derived from the secret, and tells the donor on the
   libp2p stream which way it takes the chunks (``{"via": "lane"}`` or ``{"via": "stream"}``);
4. the donor sends each wanted chunk ``i`` as AES-256-GCM of the chunk under :func:`lane_key`
   with nonce ``i`` (:func:`seal_chunk`); the joiner reads exactly ``chunk_length(i) + SEAL_BYTES``
   bytes, opens the seal (:func:`open_chunk`) and then checks the chunk against the signed
   manifest, as on the stream.

The seal makes the lane as private and tamper-evident as the stream: nobody on the path reads
the state, and a changed byte fails the tag. A failed tag is the path's fault or the donor's
(nobody else holds the key), so it is not counted against the donor (:class:`LaneSealBroken`,
a connection failure: the joiner keeps its verified chunks and asks again over the stream); a
chunk whose seal opens but whose hash is wrong is the donor's lie, refused as on the stream.

Pure: no sockets here; the daemon (``p2pfm.daemon.lanes``) moves the bytes.
"""

from __future__ import annotations

import hashlib
import ipaddress
from dataclasses import dataclass

import msgpack
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from p2pfm.core.errors import Malformed

SECRET_BYTES = 32  # the manifest's lane secret
TICKET_BYTES = 32  # what the joiner sends first on the lane
SEAL_BYTES = 16  # the AES-GCM tag each sealed chunk carries
MAX_LANE_HOSTS = 4  # hosts of the donor's announcement tried, at most (a connect each)
VIA_FRAME_BYTES = 64  # the joiner's {"via": ...} frame on the libp2p stream
VIA = ("lane", "stream")


class LaneSealBroken(ConnectionError):
    """A sealed chunk failed its tag: changed on the path (or by the donor). The lane is dropped,
    the chunks verified so far are kept, and the rest come over the libp2p stream."""


@dataclass(frozen=True)
class LaneOffer:
    """A donor's offer in its manifest: a TCP port and this transfer's secret."""

    port: int
    secret: bytes

    def payload(self) -> dict:
        return {"port": self.port, "secret": self.secret}


def lane_ticket(secret: bytes) -> bytes:
    """What the joiner sends first on the lane: proves it read the manifest, names the transfer.
    A hash of the secret, so the ticket (which crosses the lane in the clear) says nothing of the key."""
    return hashlib.sha256(b"p2pfm/lane/ticket\x00" + secret).digest()


def lane_key(secret: bytes) -> bytes:
    """The AES-256-GCM key of one transfer's chunks."""
    return hashlib.sha256(b"p2pfm/lane/key\x00" + secret).digest()


def chunk_nonce(index: int) -> bytes:
    """Chunk ``index``'s GCM nonce: unique within a transfer (each chunk is sent at most once under
    a key: a key is never reused across transfers, the secret is fresh each time)."""
    return index.to_bytes(12, "big")


class LaneCipher:
    """Seals and opens one transfer's chunks (AES-256-GCM, ~5 GB/s with AES-NI)."""

    def __init__(self, secret: bytes) -> None:
        self._aead = AESGCM(lane_key(secret))

    def seal_chunk(self, index: int, piece: bytes) -> bytes:
        """Chunk ``index`` as it crosses the lane: ciphertext then the 16-byte tag."""
        return self._aead.encrypt(chunk_nonce(index), piece, None)

    def open_chunk(self, index: int, sealed: bytes | bytearray | memoryview) -> bytes:
        """The chunk inside ``sealed``; :class:`LaneSealBroken` if any byte changed (or it is
        another chunk's seal)."""
        try:
            return self._aead.decrypt(chunk_nonce(index), sealed, None)
        except InvalidTag:
            raise LaneSealBroken(f"state chunk {index} failed its lane seal") from None


def lane_hosts(maddrs: tuple[str, ...] | list[str]) -> list[str]:
    """The IP hosts of a donor's announced multiaddrs to try the lane on, in order, without
    repeats, relays (``p2p-circuit``: no direct path), unspecified or multicast addresses, or
    names (``dns4``: the lane only connects to literals); at most ``MAX_LANE_HOSTS``.

    The list comes from the donor's own signed announcement, so a donor can only make a joiner
    knock (with a random ticket) where it claims to live.
    """
    hosts: list[str] = []
    for maddr in maddrs:
        if not isinstance(maddr, str) or "/p2p-circuit" in maddr:
            continue
        parts = maddr.split("/")
        if len(parts) < 5 or parts[0] != "" or parts[1] not in ("ip4", "ip6") or parts[3] != "tcp":
            continue
        try:
            address = ipaddress.ip_address(parts[2])
        except ValueError:
            continue
        if address.is_unspecified or address.is_multicast or (parts[1] == "ip4") != (address.version == 4):
            continue
        host = str(address)
        if host not in hosts:
            hosts.append(host)
        if len(hosts) == MAX_LANE_HOSTS:
            break
    return hosts


def via_frame(via: str) -> bytes:
    """The joiner's word on the libp2p stream, after the manifest offered a lane: which way the
    chunks go (``"lane"``: it connected and sent its ticket; ``"stream"``: it could not)."""
    assert via in VIA
    return msgpack.packb({"via": via})


def parse_via(data: bytes) -> str:
    """The joiner's ``{"via": "lane" | "stream"}``; [REJECT] MALFORMED for anything else."""
    try:
        value = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except Exception as exc:  # noqa: BLE001 - any msgpack failure is the same refusal
        raise Malformed(f"lane choice is not msgpack: {exc}") from None
    if not isinstance(value, dict) or set(value) != {"via"} or value["via"] not in VIA:
        raise Malformed('lane choice must be {"via": "lane"} or {"via": "stream"}')
    return value["via"]
