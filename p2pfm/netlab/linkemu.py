"""Delay and loss for a namespace's link without netem: a netfilter queue (NFQUEUE) reader.

Some kernels (this machine's among them) are built without ``sch_netem``. They still have
NFQUEUE: iptables hands every packet's *metadata* to this process, which answers ACCEPT
after the configured delay (a heap of due times) or DROP with the configured probability.
The packets themselves stay in the kernel, so the cost is two small netlink messages per
packet. Rate limits are the kernel's ``tbf`` qdisc (see :mod:`p2pfm.netlab.netns`).

Run inside the namespace whose traffic it shapes (netlink queues are per namespace)::

    python p2pfm/netlab/linkemu.py --queue 0 --delay-ms 25 --loss-pct 0.5 --seed 1

It imports nothing but the standard library, so that it runs by path from any directory.

with rules such as ``iptables -t mangle -A OUTPUT -o eth0 -j NFQUEUE --queue-num 0
--queue-bypass`` (bypass: if this process dies, packets pass undelayed, never stall).

The netlink protocol spoken here (linux/netfilter/nfnetlink_queue.h): bind a queue with
NFQNL_MSG_CONFIG, ask for metadata only (NFQNL_COPY_META), read NFQNL_MSG_PACKET, answer
NFQNL_MSG_VERDICT {verdict, packet id}.
"""

from __future__ import annotations

import argparse
import heapq
import random
import signal
import socket
import struct
import sys
import time

NETLINK_NETFILTER = 12
SOL_NETLINK = 270
NETLINK_NO_ENOBUFS = 5
NFNL_SUBSYS_QUEUE = 3
NFQNL_MSG_PACKET, NFQNL_MSG_VERDICT, NFQNL_MSG_CONFIG = 0, 1, 2
NFQA_CFG_CMD, NFQA_CFG_PARAMS, NFQA_CFG_QUEUE_MAXLEN = 1, 2, 3
NFQNL_CFG_CMD_BIND = 1
NFQNL_COPY_META = 1
NFQA_PACKET_HDR = 1
NFQA_VERDICT_HDR = 2
NF_DROP, NF_ACCEPT = 0, 1
NLM_F_REQUEST, NLM_F_ACK = 1, 4
NLMSG_ERROR = 2
NLMSG_HDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid (host order)
NFGEN_HDR = struct.Struct("!BBH")  # family, version, queue number (big endian)


def _attr(kind: int, payload: bytes) -> bytes:
    raw = struct.pack("=HH", 4 + len(payload), kind) + payload
    return raw + b"\0" * (-len(raw) % 4)


class NfQueue:
    """One bound netfilter queue on a netlink socket."""

    def __init__(self, queue: int, maxlen: int = 8192) -> None:
        self.queue = queue
        self.seq = 0
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
        self.sock.setsockopt(SOL_NETLINK, NETLINK_NO_ENOBUFS, 1)
        self.sock.bind((0, 0))
        self._config(_attr(NFQA_CFG_CMD, struct.pack("!BxH", NFQNL_CFG_CMD_BIND, socket.AF_INET)))
        self._config(_attr(NFQA_CFG_PARAMS, struct.pack("!IB", 0, NFQNL_COPY_META)))
        self._config(_attr(NFQA_CFG_QUEUE_MAXLEN, struct.pack("!I", maxlen)))

    def _send(self, msg_type: int, flags: int, body: bytes) -> None:
        self.seq += 1
        header = NLMSG_HDR.pack(
            NLMSG_HDR.size + len(body),
            (NFNL_SUBSYS_QUEUE << 8) | msg_type,
            NLM_F_REQUEST | flags,
            self.seq,
            0,
        )
        self.sock.send(header + body)

    def _config(self, attrs: bytes) -> None:
        self._send(NFQNL_MSG_CONFIG, NLM_F_ACK, NFGEN_HDR.pack(socket.AF_UNSPEC, 0, self.queue) + attrs)
        data = self.sock.recv(65536)
        length, kind, _, _, _ = NLMSG_HDR.unpack_from(data)
        if kind == NLMSG_ERROR:
            (error,) = struct.unpack_from("=i", data, NLMSG_HDR.size)
            if error:
                raise OSError(-error, f"nfqueue config refused: {-error}")

    def verdict(self, packet_id: int, verdict: int) -> None:
        body = NFGEN_HDR.pack(socket.AF_UNSPEC, 0, self.queue) + _attr(
            NFQA_VERDICT_HDR, struct.pack("!II", verdict, packet_id)
        )
        self._send(NFQNL_MSG_VERDICT, 0, body)

    def packets(self, timeout: float | None) -> list[int]:
        """Ids of the packets queued since the last call (waits up to ``timeout`` for one)."""
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(1 << 20)
        except TimeoutError:
            return []
        ids = []
        offset = 0
        while offset + NLMSG_HDR.size <= len(data):
            length, kind, _, _, _ = NLMSG_HDR.unpack_from(data, offset)
            if length < NLMSG_HDR.size:
                break
            if kind == (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_PACKET:
                pos = offset + NLMSG_HDR.size + NFGEN_HDR.size
                end = offset + length
                while pos + 4 <= end:
                    attr_len, attr_type = struct.unpack_from("=HH", data, pos)
                    if attr_len < 4:
                        break
                    if attr_type & 0x7FFF == NFQA_PACKET_HDR:
                        ids.append(struct.unpack_from("!I", data, pos + 4)[0])
                        break
                    pos += (attr_len + 3) & ~3
            offset += (length + 3) & ~3
        return ids


def serve(queue: int, delay_s: float, loss: float, seed: int) -> None:
    nfq = NfQueue(queue)
    rng = random.Random(seed)
    due: list[tuple[float, int]] = []
    running = True

    def stop(*_: object) -> None:
        nonlocal running
        running = False

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    print(f"linkemu: queue {queue}, delay {delay_s * 1000:.1f} ms, loss {loss * 100:.2f}%", flush=True)
    while running:
        now = time.monotonic()
        while due and due[0][0] <= now:
            nfq.verdict(heapq.heappop(due)[1], NF_ACCEPT)
        timeout = max(0.0, due[0][0] - now) if due else 0.5
        for packet_id in nfq.packets(timeout):
            if loss and rng.random() < loss:
                nfq.verdict(packet_id, NF_DROP)
            elif delay_s <= 0:
                nfq.verdict(packet_id, NF_ACCEPT)
            else:
                heapq.heappush(due, (time.monotonic() + delay_s, packet_id))
    for _, packet_id in due:  # leave nothing stuck in the kernel
        nfq.verdict(packet_id, NF_ACCEPT)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queue", type=int, default=0)
    parser.add_argument("--delay-ms", type=float, default=0.0)
    parser.add_argument("--loss-pct", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    serve(args.queue, args.delay_ms / 1000, args.loss_pct / 100, args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
