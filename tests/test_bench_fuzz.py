"""``p2pfm bench fuzz`` in memory: deterministic messages, and a campaign against the real handlers.

The handlers run in-process on the in-memory streams of ``tests/test_daemon_handlers.py``; the
integration test ``tests/integration/test_bench_fuzz.py`` runs the same over real libp2p.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter

import msgpack
import pytest
from test_daemon_handlers import RUN, MemoryWriter, runtime

from p2pfm.bench.fuzz import Campaign, FuzzConfig, Outcome, classify, passed, summary
from p2pfm.bench.fuzz_cases import FuzzMessage, MessageFactory, TargetInfo, frame_of
from p2pfm.core.envelope import open_envelope
from p2pfm.core.errors import Reject
from p2pfm.core.identity import Identity
from p2pfm.daemon.handlers import StreamHandlers

NOW = 1_700_000_000.0


def factory(seed: int) -> MessageFactory:
    return MessageFactory(seed, TargetInfo(run_id=RUN, numel=300, round=5), start=NOW)


def test_fuzz_messages_are_deterministic_from_the_seed():
    """The same seed and clock give the same messages byte for byte; another seed does not."""
    a, b, c = factory(7), factory(7), factory(8)
    first = [a.next(NOW + i) for i in range(600)]
    assert first == [b.next(NOW + i) for i in range(600)]
    assert [m.frame for m in first] != [c.next(NOW + i).frame for i in range(600)]


def test_the_factory_covers_every_family_and_stream_with_a_few_controls():
    """All families reach all three streams; about control_fraction of the messages are valid."""
    f = factory(1)
    messages = [f.next(NOW) for _ in range(4000)]
    seen = Counter((m.family, m.stream) for m in messages)
    families = set(MessageFactory.FAMILIES) - {"replay"}  # replays need delivered controls
    assert {(fam, s) for fam in families for s in ("gossip", "state", "params")} <= set(seen)
    valid = [m for m in messages if m.valid]
    assert all(m.family == "control" for m in valid)
    assert 40 <= len(valid) <= 130


class CancellingFlips(random.Random):
    """An RNG that picks ``bitflip`` and flips the same bit twice (what once let a valid message through)."""

    def choice(self, seq):
        return "bitflip" if "bitflip" in seq else super().choice(seq)

    def randrange(self, start, stop=None, step=1):
        if (start, stop) == (1, 4):
            return 2  # two flips
        if stop is None:
            return min(5, start - 1)  # the same byte and bit each time
        return super().randrange(start, stop, step)


def test_byte_mutations_never_leave_the_message_valid():
    """Two flips of the same bit cancel out; the mutator then flips once more (regression: one such
    message in a 100k live campaign was counted as an invalid message accepted)."""
    f = factory(2)
    f.rng = CancellingFlips(2)
    for stream in ("gossip", "state", "params"):
        message = f._bytes(stream, NOW)
        with pytest.raises(Reject):
            open_envelope(message.frame[4:], run_id=RUN, now=NOW)


class MemorySender:
    """The handlers of one in-process peer, reached under one remote name (a libp2p id in real life)."""

    def __init__(self, handlers: StreamHandlers, name: str) -> None:
        self.handlers, self.name = handlers, name

    async def exchange(self, message: FuzzMessage, timeout, more_frames):
        handler = getattr(self.handlers, f"handle_{message.stream}")
        reader = asyncio.StreamReader()
        reader.feed_data(message.frame)
        reader.feed_eof()
        writer = MemoryWriter()
        try:
            await handler(self.name, reader, writer)
        except (asyncio.IncompleteReadError, TimeoutError, ConnectionError):
            pass  # what the network layer's wrapper treats as a stream that ended early
        if not message.expect_answer:
            return [], "not_awaited"
        frames = writer.frames()
        return frames, None if frames else "closed"

    async def close(self) -> None:
        return None


class MemoryMembers:
    """Member keys for the in-process peer: it keeps no member list, so any key will do."""

    def __init__(self, sender: MemorySender) -> None:
        self.sender = sender
        self.keys = 0

    async def next_key(self) -> Identity:
        self.keys += 1
        return Identity.generate()

    def retire(self, key: Identity) -> None:
        pass

    async def close(self) -> None:
        pass


def campaign(tmp_path, count: int, sender_class=MemorySender) -> dict:
    rt = runtime(tmp_path)
    handlers = StreamHandlers(rt)
    names = iter(range(1_000_000))

    async def new_sender():
        return sender_class(handlers, f"remote-{next(names)}")

    async def go():
        config = FuzzConfig(count=count, seed=3, concurrency=4, check_every=500)
        members = MemoryMembers(sender_class(handlers, "member"))
        return await Campaign(config, RUN, new_sender, members=members).run()

    return summary(asyncio.run(go()), 1.0, 3)


def test_an_in_process_campaign_accepts_nothing_invalid_and_answers_every_control(tmp_path):
    """2,000 messages against the real handlers: every control accepted, nothing invalid accepted,
    no handler exception, and the refusals spread over many reasons (the ban check's included)."""
    result = campaign(tmp_path, 2000)
    assert result["accepted_invalid"] == 0 and result["crashes"] == 0, result["examples"]
    assert result["controls_ok"] == result["controls"] >= 40
    assert result["tried"] >= 2000
    assert {"malformed", "schema", "bad_signature", "wrong_kind", "replay", "oversize", "non_finite",
            "shape_mismatch", "bad_index", "unknown_codec", "clock_skew", "wrong_run"} <= set(result["rejected"])  # fmt: skip
    assert (
        result["ignored"]["banned"] >= 5 and result["ignored"]["future_round"] > 0
    )  # the sender banned on purpose
    assert set(result["dropped"]) == {"not_awaited"}
    assert passed(result)


class YesSender(MemorySender):
    """A broken peer that says ok to every update."""

    async def exchange(self, message, timeout, more_frames):
        frames, error = await super().exchange(message, timeout, more_frames)
        if message.stream == "gossip" and message.expect_answer:
            return [msgpack.packb({"ok": True})], None
        return frames, error


def test_a_campaign_fails_a_peer_that_accepts_invalid_updates(tmp_path):
    """accepted_invalid counts them, with examples, and the campaign does not pass."""
    result = campaign(tmp_path, 400, YesSender)
    assert result["accepted_invalid"] > 50
    assert result["examples"][0]["what"] == "accepted_invalid"
    assert not passed(result)


def test_classify_names_refusals_ignores_silence_and_bad_answers():
    """Refusal maps give their reason; ignore reasons are ignored; no frames is dropped with why."""
    update = FuzzMessage(0, "gossip", "bytes", "x", frame_of(b"x"), False)
    refusal = msgpack.packb({"ok": False, "reason": "bad_signature"})
    assert classify(update, [refusal], None, RUN, NOW) == Outcome("rejected", "bad_signature")
    ignored = msgpack.packb({"ok": False, "reason": "future_round"})
    assert classify(update, [ignored], None, RUN, NOW) == Outcome("ignored", "future_round")
    paced = msgpack.packb({"ok": False, "reason": "rate_limited"})
    assert classify(update, [paced], None, RUN, NOW) == Outcome("ignored", "rate_limited")
    newer = msgpack.packb({"ok": False, "reason": "a_reason_added_later"})  # counted, as a rejection
    assert classify(update, [newer], None, RUN, NOW) == Outcome("rejected", "a_reason_added_later")
    assert classify(update, [], "timeout", RUN, NOW) == Outcome("dropped", "timeout")
    assert classify(update, [b"\xc1"], None, RUN, NOW) == Outcome("dropped", "bad_answer")
    request = FuzzMessage(0, "params", "bytes", "x", frame_of(b"x"), False)
    assert classify(request, [msgpack.packb([b"x", b"y"])], None, RUN, NOW).verdict == "dropped"
