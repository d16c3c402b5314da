"""``p2pfm keygen`` and ``p2pfm id``: create an identity key file, show a key's peer id."""

from __future__ import annotations

import argparse
import sys


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``keygen --out PATH [--force]`` and ``id PATH``."""
    keygen = subparsers.add_parser(
        "keygen",
        help="create an Ed25519 identity key file (mode 0600) and print its peer id",
        description="Create an Ed25519 identity key (PEM PKCS#8, mode 0600) and print its peer id.",
    )
    keygen.add_argument("--out", required=True, metavar="PATH", help="where to write the key file")
    keygen.add_argument("--force", action="store_true", help="overwrite an existing key file")
    keygen.set_defaults(handler=run_keygen)

    show = subparsers.add_parser(
        "id",
        help="print the peer id of a key file",
        description="Print the peer id of an Ed25519 key file written by `p2pfm keygen`.",
    )
    show.add_argument("path", metavar="PATH", help="key file")
    show.set_defaults(handler=run_id)


def run_keygen(args: argparse.Namespace) -> int:
    from p2pfm.core.identity import Identity

    identity = Identity.generate()
    identity.save(args.out, force=args.force)
    print(f"wrote {args.out} (mode 0600); keep it private, it is this peer's identity", file=sys.stderr)
    print(identity.peer_id)
    return 0


def run_id(args: argparse.Namespace) -> int:
    from p2pfm.core.identity import Identity

    print(Identity.load(args.path).peer_id)
    return 0
