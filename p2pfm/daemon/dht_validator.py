"""A hivemind record validator: honest DHT nodes store under the swarm's key only what a reader accepts.

Readers always checked every record (``p2pfm.core.announce.check_announcement``), but the DHT
itself stored anything: a stranger could overwrite a peer's subkey with a junk record (erasing
the peer from discovery for the junk's lifetime, an hour in the observed attack) or fill the
key with thousands of records. With this validator every honest node refuses, at storage and
on the way back from a lookup, any record under the swarm's key that is not an announcement
signed by the peer its subkey names, and any whose expiration reaches further than the
signer's own announcement could (timestamp + TTL + clock skew): a replay cannot keep a
departed peer alive. Plain values over the swarm's key are refused too. Other keys pass
untouched (hivemind's own records).

Runs inside hivemind's DHT child process, so it is a module-level, picklable class; it reads
the clock there (this is daemon code, not the core).
"""

from __future__ import annotations

import time

from hivemind.dht.protocol import DHTProtocol
from hivemind.dht.routing import DHTID
from hivemind.dht.validation import DHTRecord, RecordValidatorBase

from p2pfm.core.announce import announcement_limits, check_announcement
from p2pfm.core.envelope import EnvelopeLimits
from p2pfm.core.errors import Refusal


class AnnouncementValidator(RecordValidatorBase):
    """Accepts under ``dht_key`` only announcements of the run signed by their subkey's peer."""

    def __init__(self, run_id: str, dht_key: str, ttl_s: float, limits: EnvelopeLimits) -> None:
        self.run_id = run_id
        self.key_id = DHTID.generate(source=dht_key).to_bytes()
        self.ttl_s = ttl_s
        self.limits = announcement_limits(limits, ttl_s)

    def validate(self, record: DHTRecord) -> bool:
        if record.key != self.key_id:
            return True  # not ours to judge
        if record.subkey == DHTProtocol.IS_REGULAR_VALUE:
            return False  # a plain value over the swarm's key would hide every announcement
        try:
            subkey = DHTProtocol.serializer.loads(record.subkey)
            value = DHTProtocol.serializer.loads(record.value)
            announcement = check_announcement(
                subkey, value, run_id=self.run_id, now=time.time(), limits=self.limits
            )
        except Refusal:
            return False
        except Exception:  # undecodable msgpack from a stranger: refused, never raised into hivemind
            return False
        return record.expiration_time <= announcement.timestamp + self.ttl_s + self.limits.max_clock_skew_s

    @property
    def priority(self) -> int:
        return 10  # validate (and refuse) before any other validator looks at the value
