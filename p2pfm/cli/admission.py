"""``p2pfm admit`` and ``p2pfm revoke``: the swarm authority's two jobs.

An admitted swarm trusts one authority key. ``p2pfm admit`` signs a certificate that lets one
peer id into one swarm (optionally until a date); the peer runs with ``--authority ID --cert
CERT``. ``p2pfm revoke`` signs the complete list of peer ids no longer admitted; give the file
to any peer (``--revocations FILE``): peers publish it in the DHT, and every peer drops the
listed ones at its next lookup. See ``p2pfm.core.admission`` and ``protocols/wire.md`` section 7.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from pathlib import Path

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhdw])$")
_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def expiry(text: str, now: float) -> float:
    """``--expires``: a duration from now (``30d``, ``12h``, ``90m``) or ``never`` (0)."""
    if text == "never":
        return 0.0
    match = _DURATION.match(text)
    if match is None:
        raise argparse.ArgumentTypeError(
            f"expected a duration like 30d, 12h or 90m, or 'never'; got {text!r}"
        )
    return now + float(match.group(1)) * _SECONDS[match.group(2)]


def peer_id_of(text: str) -> str:
    """A peer id, or the path of a key file whose peer id is meant."""
    from p2pfm.core.identity import Identity

    if text.startswith("p2pfm1"):
        return text
    if Path(text).is_file():
        return Identity.load(text).peer_id
    raise argparse.ArgumentTypeError(f"{text!r} is neither a peer id (p2pfm1...) nor a key file")


def write_private(path: Path, data: bytes) -> None:
    """Write atomically; certificates are not secret, but nobody else should replace them."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    os.replace(tmp, path)


def register(subparsers: argparse._SubParsersAction) -> None:
    admit = subparsers.add_parser(
        "admit",
        help="sign a certificate admitting one peer to a swarm (run by the swarm authority)",
        description="Sign a certificate with the swarm authority's key that admits one peer id to one swarm. "
        "The peer then runs `p2pfm peer --authority AUTHORITY_ID --cert CERT`. Make the authority key once "
        "with `p2pfm keygen --out authority.key` and keep it off the peers.",
    )
    admit.add_argument(
        "--authority", required=True, type=Path, metavar="KEY", help="the authority's key file"
    )
    admit.add_argument("--peer", required=True, metavar="ID", help="the peer id to admit (or its key file)")
    admit.add_argument("--run-id", default="p2pfm-default", help="the swarm (run id) the certificate is for")
    admit.add_argument(
        "--out", required=True, type=Path, metavar="CERT", help="where to write the certificate"
    )
    admit.add_argument("--expires", default="never", metavar="DURATION", help="e.g. 30d, 12h; default never")
    admit.add_argument("--serial", type=int, default=None, help="certificate serial (default: time in ms)")
    admit.set_defaults(handler=run_admit)

    revoke = subparsers.add_parser(
        "revoke",
        help="sign the list of peers no longer admitted (run by the swarm authority)",
        description="Sign the complete list of revoked peer ids for a swarm. Give the file to any peer "
        "(`p2pfm peer --revocations FILE`): it is published in the DHT and every peer drops the listed ones "
        "(their updates, syncs and state requests) at its next lookup. A newer list (higher serial) "
        "replaces an older one, so always list everyone still revoked.",
    )
    revoke.add_argument(
        "--authority", required=True, type=Path, metavar="KEY", help="the authority's key file"
    )
    revoke.add_argument(
        "--peer", nargs="+", default=[], metavar="ID", help="peer ids (or key files) to revoke"
    )
    revoke.add_argument("--run-id", default="p2pfm-default", help="the swarm (run id)")
    revoke.add_argument("--out", required=True, type=Path, metavar="FILE", help="where to write the list")
    revoke.add_argument("--serial", type=int, default=None, help="list serial (default: time in ms)")
    revoke.set_defaults(handler=run_revoke)


def run_admit(args: argparse.Namespace) -> int:
    from p2pfm.config import ConfigError
    from p2pfm.core.admission import issue_certificate, read_certificate
    from p2pfm.core.identity import Identity

    now = time.time()
    try:
        peer, expires = peer_id_of(args.peer), expiry(args.expires, now)
        authority = Identity.load(args.authority)
        serial = args.serial if args.serial is not None else int(now * 1000)
        cert = issue_certificate(authority, args.run_id, peer, issued=now, expires=expires, serial=serial)
    except (argparse.ArgumentTypeError, ValueError) as exc:
        raise ConfigError(str(exc)) from None
    write_private(args.out, cert)
    read_certificate(cert)  # what we wrote reads back
    until = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(expires)) if expires else "until revoked"
    print(f"wrote {args.out}: {peer} admitted to swarm {args.run_id!r} {until}", file=sys.stderr)
    print(
        f"the peer runs: p2pfm peer --run-id {args.run_id} --authority {authority.peer_id} --cert {args.out}"
    )
    return 0


def run_revoke(args: argparse.Namespace) -> int:
    from p2pfm.config import ConfigError
    from p2pfm.core.admission import issue_revocations
    from p2pfm.core.identity import Identity

    now = time.time()
    try:
        peers = [peer_id_of(p) for p in args.peer]
        authority = Identity.load(args.authority)
        serial = args.serial if args.serial is not None else int(now * 1000)
        data = issue_revocations(authority, args.run_id, peers, serial=serial, issued=now)
    except (argparse.ArgumentTypeError, ValueError) as exc:
        raise ConfigError(str(exc)) from None
    write_private(args.out, data)
    print(f"wrote {args.out}: {len(set(peers))} peer(s) revoked in swarm {args.run_id!r} (serial {serial})")
    return 0
