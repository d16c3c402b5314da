"""Send hand-crafted messages to a live peer: how tests (and operators) check its defences.

    python -m p2pfm.daemon.probe --peer MULTIADDR --run-id RUN --numel N --case forged

Cases: ``valid`` (a correctly signed zero update), ``replayed`` (the same valid bytes twice),
``forged`` (signature made with another key), ``tampered`` (one payload byte flipped after
signing), ``wrong-run``, ``garbage`` (random bytes), ``oversize`` (a frame header announcing
more than the peer accepts), ``announce`` (a valid signed message of a kind no stream takes as a
request). ``--stream state|params`` sends them to the state or params stream instead of gossip:
a peer must refuse anything but a state request there, with its reason. Prints one JSON line
per message sent with the peer's answer.

Only announced peers' messages count (``protocols/wire.md`` section 6.2), so the prober first
joins the swarm's DHT and announces itself like a peer (one key for every case), and with
``--status`` waits until the target lists it live in its status.json. Runs as its own process:
it needs its own libp2p host (hivemind's DHT and P2P daemon).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import time
from collections.abc import Callable
from pathlib import Path

import msgpack
import numpy as np

from p2pfm.core.codecs import CodecSpec, encode
from p2pfm.core.envelope import seal
from p2pfm.core.identity import Identity
from p2pfm.daemon.net import read_frame, write_frame

CASES = ("valid", "replayed", "forged", "tampered", "wrong-run", "garbage", "oversize", "announce")
STREAMS = ("gossip", "state", "params")
ANSWER_LIMIT = 64 << 20  # the largest frame we read back (a params answer of a large model)


def build_update(identity: Identity, run_id: str, numel: int, round_: int) -> bytes:
    wire = encode(np.zeros(numel, dtype=np.float32), CodecSpec())
    return seal(
        identity,
        kind="update",
        run_id=run_id,
        round=round_,
        seq=time.time_ns(),
        timestamp=time.time(),
        payload={"tensor": wire, "weight": 1.0, "inner_steps": 1, "train_loss": 0.0, "model_hash": bytes(32)},
    )


def messages_for(case: str, run_id: str, numel: int, round_: int, me: Identity) -> list[bytes | int]:
    """The byte strings to send (an int means: announce a frame of that many bytes, send nothing)."""
    valid = build_update(me, run_id, numel, round_)
    if case == "valid":
        return [valid]
    if case == "replayed":
        return [valid, valid]
    if case == "forged":
        other = Identity.generate()
        body_sig_split = len(valid) - 64
        return [valid[:body_sig_split] + other.sign(b"not this message")]
    if case == "tampered":
        index = len(valid) // 2
        return [valid[:index] + bytes([valid[index] ^ 0x01]) + valid[index + 1 :]]
    if case == "wrong-run":
        return [build_update(me, run_id + "-other", numel, round_)]
    if case == "garbage":
        return [secrets.token_bytes(512)]
    if case == "oversize":
        return [2**31]
    if case == "announce":  # a small, valid, signed message of a kind no stream takes as a request
        return [
            seal(
                me,
                kind="announce",
                run_id=run_id,
                round=round_,
                seq=time.time_ns(),
                timestamp=time.time(),
                payload={
                    "libp2p_id": "probe",
                    "maddrs": [],
                    "round": round_,
                    "model_hash": bytes(32),
                    "device_class": "probe",
                    "power_w": 0.0,
                    "state_bytes": 0,
                },
            )
        ]
    raise ValueError(f"unknown case {case!r}; choose from {', '.join(CASES)}")


async def exchange(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, message: bytes | int, timeout: float = 10.0
) -> dict:
    """Send one message on an open stream and read the peer's answer; closes the stream.

    ``message`` as bytes is sent as one frame; an int sends only a frame header announcing that
    many bytes. The answer is the peer's map (``{"ok": true}`` or ``{"ok": false, "reason"}``),
    ``{"ok": true, "answer": "envelope"}`` for a signed answer (manifest, params), or
    ``{"ok": false, "reason": "closed"}`` if the stream ended (or ``timeout`` passed) unanswered.
    """
    try:
        if isinstance(message, int):
            writer.write(message.to_bytes(4, "big"))
            await writer.drain()
        else:
            await write_frame(writer, message)
        try:
            answer = msgpack.unpackb(await asyncio.wait_for(read_frame(reader, 64 << 20), timeout))
        except (asyncio.IncompleteReadError, TimeoutError, ConnectionError):
            answer = {"ok": False, "reason": "closed"}
        if not isinstance(answer, dict):  # an envelope: the stream's real answer (manifest, params)
            answer = {"ok": True, "answer": "envelope"}
        return answer
    finally:
        writer.close()


def current_round(round_: int, round_from: Path | None) -> int:
    """The round to claim: the target's own round read from its status file just before sending
    (a busy machine may take many seconds to start this prober, and a round fixed at launch would
    be stale by then), or ``round_`` when no status file is given."""
    if round_from is None:
        return round_
    return int(json.loads(round_from.read_text()).get("round", 0)) + 1


async def open_host(peer_maddr: str):
    """A libp2p host of our own (a fresh identity, its own ``p2pd``) that knows ``peer_maddr``;
    returns (host, the target's PeerID). Close it with ``await host.shutdown()``."""
    from hivemind.p2p import P2P, PeerID

    # A prober only dials out: no NAT services, relay, DHT server or TLS (noise secures the
    # connection); they made each start ~2x slower, and bench fuzz starts thousands.
    p2p = await P2P.create(
        initial_peers=[peer_maddr], host_maddrs=["/ip4/127.0.0.1/tcp/0"], auto_nat=False,
        nat_port_map=False, use_relay=False, dht_mode="client", conn_manager=False, tls=False,
    )  # fmt: skip
    return p2p, PeerID.from_base58(peer_maddr.rsplit("/p2p/", 1)[1])


async def exchange_raw(
    p2p,
    target,
    protocol: str,
    raw: bytes,
    *,
    timeout: float = 10.0,
    answer: bool = True,
    more_frames: Callable[[bytes], int] | None = None,
) -> tuple[list[bytes], str | None]:
    """Open one stream, write ``raw`` (frames and length prefixes included, as given), read the
    answer: (frames, None), or (frames read so far, why no more came: ``closed``, ``timeout``,
    ``reset``, ``open_failed``). ``answer=False``: close right after writing (an incomplete frame
    the peer cannot answer). ``more_frames(first)``: how many frames follow the first (state chunks)."""
    try:
        _, reader, writer = await asyncio.wait_for(p2p.call_binary_stream_handler(target, protocol), timeout)
    except Exception as exc:  # dead peer, refused stream, p2pd trouble
        return [], f"open_failed:{type(exc).__name__}"
    frames: list[bytes] = []
    try:
        writer.write(raw)
        await writer.drain()
        if not answer:
            return [], "not_awaited"
        frames.append(await asyncio.wait_for(read_frame(reader, ANSWER_LIMIT), timeout))
        for _ in range(more_frames(frames[0]) if more_frames else 0):
            frames.append(await asyncio.wait_for(read_frame(reader, ANSWER_LIMIT), timeout))
        return frames, None
    except asyncio.IncompleteReadError:
        return frames, "closed"
    except TimeoutError:
        return frames, "timeout"
    except (ConnectionError, OSError):
        return frames, "reset"
    finally:
        writer.close()


async def announce_until_seen(net, status: Path | None, round_: int, deadline_s: float = 120.0) -> None:
    """Announce ourselves (every second) until the target's status.json lists us live."""
    payload = {
        "libp2p_id": net.libp2p_id, "maddrs": net.maddrs[:16], "round": round_, "model_hash": bytes(32),
        "device_class": "probe", "power_w": 0.0, "state_bytes": 0,
    }  # fmt: skip
    started = time.monotonic()
    while True:
        await net.announce(payload, time.time())
        if status is None:
            return
        try:
            if net.identity.peer_id in json.loads(status.read_text()).get("live_peers", []):
                return
        except (OSError, ValueError):
            pass  # mid-write: read again
        if time.monotonic() - started > deadline_s:
            raise TimeoutError(f"the target did not list the prober live within {deadline_s:.0f} s")
        await asyncio.sleep(1.0)


async def probe(
    peer_maddr: str,
    run_id: str,
    numel: int,
    cases: list[str],
    round_: int,
    round_from: Path | None = None,
    stream: str = "gossip",
) -> list[dict]:
    from p2pfm.daemon.config import NetConfig
    from p2pfm.daemon.net import PeerNetwork

    me = Identity.generate()
    # A TTL under the target's (default 15 s): its DHT validator refuses records living longer.
    net = PeerNetwork(
        NetConfig(initial_peers=(peer_maddr,), announce_ttl_s=10.0, heartbeat_s=1.0), me, run_id
    )
    await net.start()
    target = peer_maddr.rsplit("/p2p/", 1)[1]
    results = []
    try:
        await announce_until_seen(net, round_from, current_round(round_, round_from))
        for case, message in [
            (c, m)
            for c in cases
            for m in messages_for(c, run_id, numel, current_round(round_, round_from), me)
        ]:
            reader, writer = await net.open_stream(target, stream)
            results.append({"case": case, **await exchange(reader, writer, message)})
    finally:
        await net.shutdown()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--peer", required=True, help="the target peer's full multiaddr (with /p2p/...)")
    parser.add_argument("--run-id", required=True)
    parser.add_argument("--numel", type=int, required=True, help="the model's parameter count")
    parser.add_argument(
        "--case", choices=CASES, nargs="+", required=True, help="one or more cases, sent in order"
    )
    parser.add_argument("--round", type=int, default=0, help="round to claim in the update")
    parser.add_argument(
        "--round-from",
        type=Path,
        default=None,
        help="the target's status.json: wait until it lists us live, then claim its round + 1",
    )
    parser.add_argument(
        "--stream", choices=STREAMS, default="gossip", help="which of the peer's streams to send to"
    )
    args = parser.parse_args()
    for result in asyncio.run(
        probe(args.peer, args.run_id, args.numel, args.case, args.round, args.round_from, args.stream)
    ):
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
