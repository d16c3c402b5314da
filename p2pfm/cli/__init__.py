"""The ``p2pfm`` command line.

Each subcommand lives in its own module with a ``register(subparsers)`` function that
declares its flags and sets ``handler``; handlers import heavy libraries (torch, hivemind)
lazily so that ``p2pfm --help`` stays instant.

Modules: ``keys`` (keygen, id), ``admission`` (admit, revoke), ``bench`` (bench codecs|swarm|compare), ``peer`` (the
daemon), ``swarm`` (local multi-peer swarm), ``sim`` (churn simulator).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from p2pfm import __version__

SUBCOMMAND_MODULES = ("keys", "admission", "peer", "swarm", "sim", "bench")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="p2pfm",
        description="Gossip-based peer-to-peer trainer for foundation models on edge devices.",
    )
    parser.add_argument("--version", action="version", version=f"p2pfm {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMAND_MODULES:
        module = importlib.import_module(f"p2pfm.cli.{name}")
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    handler = getattr(args, "handler", None)
    if handler is None:
        parser.print_help()
        return 2
    from p2pfm.config import ConfigError

    try:
        return int(handler(args) or 0)
    except ConfigError as exc:
        print(f"p2pfm: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
