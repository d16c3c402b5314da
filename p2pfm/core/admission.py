"""Admission: who belongs to a swarm, by certificate from the swarm's authority.

Every message is signed, but a signature only proves who sent it; anyone can mint a key. An
admitted swarm has an **authority**: an Ed25519 key (``p2pfm keygen``) whose peer id every
peer is configured with. The authority signs a :class:`Certificate` per peer (``p2pfm admit``):
"peer id P belongs to swarm S until T". A peer presents its certificate in its announcement;
readers keep only announcements whose certificate checks (:func:`check_certificate`), and
updates, syncs and state requests count only from peers they keep. The authority withdraws
admission with a signed :class:`RevocationList` (``p2pfm revoke``) that peers publish in the
DHT; the list with the highest serial wins.

An **open** swarm (no authority) admits every key: for experiments on one machine, and loudly
so. Formats (``protocols/wire.md`` section 7): msgpack ``[body, signature]`` where ``body`` is
the canonical msgpack of a map with exactly the listed keys; the signature covers a domain tag
and the body. Pure: the caller passes the clock.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import msgpack

from p2pfm.core.errors import NotAdmitted
from p2pfm.core.identity import (
    PUBLIC_KEY_BYTES,
    SIGNATURE_BYTES,
    Identity,
    peer_id_from_public_key,
    verify_signature,
)

CERTIFICATE_VERSION = 1
MAX_CERTIFICATE_BYTES = 512  # a certificate is ~220 bytes
MAX_REVOKED = 65_536  # peer ids in one revocation list
MAX_REVOCATION_BYTES = 48 * MAX_REVOKED  # 38-character ids plus framing
_CERT_DOMAIN = b"p2pfm-certificate-v1\x00"
_REVOCATION_DOMAIN = b"p2pfm-revocations-v1\x00"
_PEER_ID_LENGTH = 38


def _sign(identity: Identity, domain: bytes, body: dict[str, Any]) -> bytes:
    packed = msgpack.packb(dict(sorted(body.items())), use_bin_type=True)
    return msgpack.packb([packed, identity.sign(domain + packed)], use_bin_type=True)


def _unique_map(pairs: list[tuple[Any, Any]]) -> dict[Any, Any]:
    result: dict[Any, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"duplicate key {key!r}")
        result[key] = value
    return result


def _open(data: object, domain: bytes, max_bytes: int, keys: frozenset[str], what: str) -> dict[str, Any]:
    """Decode ``[body, signature]`` strictly; check the body's keys. The signature is the caller's."""
    if not isinstance(data, bytes) or len(data) > max_bytes:
        raise NotAdmitted(f"{what} is not bytes of at most {max_bytes}")
    try:
        outer = msgpack.unpackb(data, raw=False, strict_map_key=True, use_list=True)
        if not (isinstance(outer, list) and len(outer) == 2):
            raise ValueError("not [body, signature]")
        packed, signature = outer
        if not (
            isinstance(packed, bytes) and isinstance(signature, bytes) and len(signature) == SIGNATURE_BYTES
        ):
            raise ValueError("body or signature of the wrong type")
        body = msgpack.unpackb(packed, raw=False, strict_map_key=True, object_pairs_hook=_unique_map)
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        raise NotAdmitted(f"{what} is malformed: {exc}") from None
    if not isinstance(body, dict) or set(body) != keys:
        raise NotAdmitted(f"{what} must have exactly the keys {sorted(keys)}")
    body["_packed"], body["_signature"] = packed, signature
    return body


def _check_time(value: object, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
        raise NotAdmitted(f"{what} must be a finite time >= 0")
    return float(value)


# --- certificates ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Certificate:
    """The authority's word that ``peer_id`` belongs to swarm ``run_id`` until ``expires`` (0: no end)."""

    run_id: str
    peer_id: str
    authority_key: bytes
    issued: float
    expires: float
    serial: int

    @property
    def authority_id(self) -> str:
        return peer_id_from_public_key(self.authority_key)


_CERT_KEYS = frozenset({"v", "run_id", "peer", "authority", "issued", "expires", "serial"})


def issue_certificate(
    authority: Identity, run_id: str, peer_id: str, *, issued: float, expires: float = 0.0, serial: int = 0
) -> bytes:
    """A signed certificate admitting ``peer_id`` to ``run_id`` (``expires`` 0: until revoked)."""
    if not (peer_id.startswith("p2pfm1") and len(peer_id) == _PEER_ID_LENGTH):
        raise ValueError(f"{peer_id!r} is not a peer id (p2pfm1 + 32 characters; `p2pfm id KEY` prints it)")
    if expires and expires <= issued:
        raise ValueError("the certificate would expire before it is issued")
    body = {
        "v": CERTIFICATE_VERSION, "run_id": run_id, "peer": peer_id, "authority": authority.public_key_bytes,
        "issued": float(issued), "expires": float(expires), "serial": int(serial),
    }  # fmt: skip
    return _sign(authority, _CERT_DOMAIN, body)


def read_certificate(data: object) -> Certificate:
    """Parse and verify a certificate's own signature (who it admits is :func:`check_certificate`'s)."""
    body = _open(data, _CERT_DOMAIN, MAX_CERTIFICATE_BYTES, _CERT_KEYS, "certificate")
    if body["v"] != CERTIFICATE_VERSION:
        raise NotAdmitted(f"certificate version {body['v']!r} is not {CERTIFICATE_VERSION}")
    key, run_id, peer, serial = body["authority"], body["run_id"], body["peer"], body["serial"]
    if not (isinstance(key, bytes) and len(key) == PUBLIC_KEY_BYTES):
        raise NotAdmitted("certificate authority is not a 32-byte public key")
    if not (isinstance(run_id, str) and 0 < len(run_id) <= 64):
        raise NotAdmitted("certificate run_id is not a string of 1-64 characters")
    if not (isinstance(peer, str) and len(peer) == _PEER_ID_LENGTH):
        raise NotAdmitted("certificate peer is not a peer id")
    if isinstance(serial, bool) or not isinstance(serial, int) or not 0 <= serial < 1 << 63:
        raise NotAdmitted("certificate serial is not an integer in [0, 2^63)")
    if not verify_signature(key, body["_signature"], _CERT_DOMAIN + body["_packed"]):
        raise NotAdmitted("certificate signature does not verify")
    return Certificate(
        run_id=run_id, peer_id=peer, authority_key=key, issued=_check_time(body["issued"], "issued"),
        expires=_check_time(body["expires"], "expires"), serial=serial,
    )  # fmt: skip


# --- revocation lists --------------------------------------------------------------------------
@dataclass(frozen=True)
class RevocationList:
    """The authority's list of peer ids no longer admitted; a higher ``serial`` supersedes a lower."""

    run_id: str
    authority_key: bytes
    serial: int
    issued: float
    revoked: frozenset[str]

    @property
    def authority_id(self) -> str:
        return peer_id_from_public_key(self.authority_key)


_REVOCATION_KEYS = frozenset({"v", "run_id", "authority", "serial", "issued", "revoked"})


def issue_revocations(
    authority: Identity, run_id: str, revoked: Iterable[str], *, serial: int, issued: float
) -> bytes:
    """A signed revocation list (serial must grow with each new list of the same authority)."""
    ids = sorted(set(revoked))
    if len(ids) > MAX_REVOKED:
        raise ValueError(f"at most {MAX_REVOKED} revoked peers per list")
    body = {
        "v": CERTIFICATE_VERSION, "run_id": run_id, "authority": authority.public_key_bytes,
        "serial": int(serial), "issued": float(issued), "revoked": ids,
    }  # fmt: skip
    return _sign(authority, _REVOCATION_DOMAIN, body)


def read_revocations(data: object) -> RevocationList:
    body = _open(data, _REVOCATION_DOMAIN, MAX_REVOCATION_BYTES, _REVOCATION_KEYS, "revocation list")
    key, serial, revoked = body["authority"], body["serial"], body["revoked"]
    if body["v"] != CERTIFICATE_VERSION or not (isinstance(key, bytes) and len(key) == PUBLIC_KEY_BYTES):
        raise NotAdmitted("revocation list has a bad version or authority key")
    if isinstance(serial, bool) or not isinstance(serial, int) or not 0 <= serial < 1 << 63:
        raise NotAdmitted("revocation serial is not an integer in [0, 2^63)")
    if not (isinstance(revoked, list) and len(revoked) <= MAX_REVOKED):
        raise NotAdmitted(f"revoked must be a list of at most {MAX_REVOKED} peer ids")
    if not all(isinstance(p, str) and len(p) == _PEER_ID_LENGTH for p in revoked):
        raise NotAdmitted("revoked holds something that is not a peer id")
    if not isinstance(body["run_id"], str):
        raise NotAdmitted("revocation run_id is not a string")
    if not verify_signature(key, body["_signature"], _REVOCATION_DOMAIN + body["_packed"]):
        raise NotAdmitted("revocation list signature does not verify")
    return RevocationList(
        run_id=body["run_id"], authority_key=key, serial=serial,
        issued=_check_time(body["issued"], "issued"), revoked=frozenset(revoked),
    )  # fmt: skip


# --- the policy --------------------------------------------------------------------------------
@dataclass
class Admission:
    """Who may take part: everyone (``authority`` None: an open swarm) or holders of its certificates.

    ``check`` is the rule a reader applies to an announcement's certificate; ``revoke`` takes a
    newer revocation list. Revocations are remembered for the process's life (bounded by
    :data:`MAX_REVOKED` per list).
    """

    run_id: str
    authority: str | None = None  # the authority's peer id; None = open swarm
    revocations: RevocationList | None = None
    _revoked: frozenset[str] = field(default_factory=frozenset)

    @property
    def open(self) -> bool:
        return self.authority is None

    def check(self, peer_id: str, certificate: object, now: float) -> Certificate | None:
        """[REJECT] NOT_ADMITTED unless ``certificate`` admits ``peer_id`` to this swarm now.

        Rules in order: parse and signature; issued by our authority; for our run; for this
        peer; not yet expired (issue time may be ahead by a clock's skew, not more); not revoked.
        In an open swarm nothing is checked and None is returned.
        """
        if self.authority is None:
            return None
        if peer_id in self._revoked:
            raise NotAdmitted(
                f"{peer_id} is revoked (list {self.revocations.serial if self.revocations else '?'})"
            )
        if certificate is None:
            raise NotAdmitted(f"{peer_id} presented no certificate; this swarm admits by certificate")
        cert = read_certificate(certificate)
        if cert.authority_id != self.authority:
            raise NotAdmitted(f"certificate of {peer_id} is signed by {cert.authority_id}, not our authority")
        if cert.run_id != self.run_id:
            raise NotAdmitted(f"certificate of {peer_id} is for swarm {cert.run_id!r}, not {self.run_id!r}")
        if cert.peer_id != peer_id:
            raise NotAdmitted(f"certificate for {cert.peer_id} presented by {peer_id}")
        if cert.expires and cert.expires <= now:
            raise NotAdmitted(f"certificate of {peer_id} expired at {cert.expires:.0f}")
        return cert

    def revoke(self, data: object) -> bool:
        """Take a revocation list if it is our authority's, for our run, and newer; True if taken."""
        if self.authority is None:
            return False
        listed = read_revocations(data)
        if listed.authority_id != self.authority or listed.run_id != self.run_id:
            raise NotAdmitted("revocation list of another authority or swarm")
        if self.revocations is not None and listed.serial <= self.revocations.serial:
            return False
        self.revocations = listed
        self._revoked = listed.revoked  # each list is complete: the newest one says who is out
        return True

    def is_revoked(self, peer_id: str) -> bool:
        return peer_id in self._revoked
