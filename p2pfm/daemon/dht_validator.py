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

In an admitted swarm it also refuses announcements whose certificate does not admit their
signer (200 fresh identities used to be stored in seconds and counted as live), and under the
swarm's revocation key it stores only revocation lists signed by the swarm's authority, under
their serial as subkey.

Runs inside hivemind's DHT child process, so it is a module-level, picklable class; it reads
the clock there (this is daemon code, not the core).
"""

from __future__ import annotations

import time

from hivemind.dht.protocol import DHTProtocol
from hivemind.dht.routing import DHTID
from hivemind.dht.validation import DHTRecord, RecordValidatorBase

from p2pfm.core.admission import Admission
from p2pfm.core.announce import announcement_limits, check_announcement
from p2pfm.core.envelope import EnvelopeLimits
from p2pfm.core.errors import Refusal

REVOCATION_TTL_S = 3600.0  # a published revocation list lives an hour; peers re-publish it


class AnnouncementValidator(RecordValidatorBase):
    """Accepts under ``dht_key`` only announcements of the run signed by their subkey's peer
    (and admitted, in an admitted swarm); under ``revocations_key`` only our authority's lists."""

    def __init__(
        self,
        run_id: str,
        dht_key: str,
        ttl_s: float,
        limits: EnvelopeLimits,
        admission: Admission | None = None,
        revocations_key: str | None = None,
    ) -> None:
        self.run_id = run_id
        self.key_id = DHTID.generate(source=dht_key).to_bytes()
        self.ttl_s = ttl_s
        self.limits = announcement_limits(limits, ttl_s)
        self.admission = Admission(run_id, admission.authority) if admission is not None else None
        self.revocations_id = (
            DHTID.generate(source=revocations_key).to_bytes() if revocations_key is not None else None
        )

    def _validate_revocations(self, record: DHTRecord) -> bool:
        if self.admission is None or self.admission.open or record.subkey == DHTProtocol.IS_REGULAR_VALUE:
            return False
        try:
            subkey = DHTProtocol.serializer.loads(record.subkey)
            value = DHTProtocol.serializer.loads(record.value)
            probe = Admission(self.run_id, self.admission.authority)
            probe.revoke(value)
        except Exception:  # junk, another authority's list, or undecodable: refused, never raised
            return False
        listed = probe.revocations
        return listed is not None and subkey == str(listed.serial)

    def validate(self, record: DHTRecord) -> bool:
        if self.revocations_id is not None and record.key == self.revocations_id:
            return self._validate_revocations(record)
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
            if self.admission is not None:  # sybils without a certificate are not even stored
                self.admission.check(announcement.peer_id, announcement.cert, time.time())
        except Refusal:
            return False
        except Exception:  # undecodable msgpack from a stranger: refused, never raised into hivemind
            return False
        return record.expiration_time <= announcement.timestamp + self.ttl_s + self.limits.max_clock_skew_s

    @property
    def priority(self) -> int:
        return 10  # validate (and refuse) before any other validator looks at the value
