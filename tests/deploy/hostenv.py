"""What the deploy tests need from the machine: Debian packages, a cache folder, phase timings.

The tests run as root on a fresh Debian machine (CI) as well as on a developer's: whatever
is missing is installed here with apt, and whatever is expensive to make (the debootstrap
base image, the wheels) is kept under ``CACHE_DIR`` so that reruns are fast.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

CACHE_DIR = Path(os.environ.get("P2PFM_DEPLOY_CACHE", "/var/cache/p2pfm-deploy"))
REPO = Path(__file__).resolve().parents[2]

_apt_updated = False


def log(message: str) -> None:
    print(f"[deploy {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


class Phases:
    """Wall time of each named phase, printed as it ends and as a table at the end."""

    def __init__(self) -> None:
        self.times: list[tuple[str, float]] = []

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        log(f"{name} ...")
        start = time.monotonic()
        try:
            yield
        finally:
            took = time.monotonic() - start
            self.times.append((name, took))
            log(f"{name}: {took:.1f} s")

    def table(self) -> str:
        width = max((len(n) for n, _ in self.times), default=10)
        lines = [f"  {name:<{width}}  {took:7.1f} s" for name, took in self.times]
        lines.append(f"  {'total':<{width}}  {sum(t for _, t in self.times):7.1f} s")
        return "phase timings:\n" + "\n".join(lines)


def run(
    *cmd: str | os.PathLike,
    check: bool = True,
    timeout: float | None = None,
    env: dict[str, str] | None = None,
    cwd: str | os.PathLike | None = None,
    quiet: bool = False,
) -> subprocess.CompletedProcess:
    """Run a command, capturing output; on failure raise with the tail of its output."""
    args = [str(c) for c in cmd]
    if not quiet:
        log("$ " + " ".join(args))
    res = subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd)
    if check and res.returncode != 0:
        tail = (res.stdout[-3000:] + "\n" + res.stderr[-3000:]).strip()
        raise RuntimeError(f"command failed ({res.returncode}): {' '.join(args)}\n{tail}")
    return res


def is_root() -> bool:
    return os.geteuid() == 0


def apt_install(packages: list[str], commands: dict[str, str] | None = None) -> None:
    """Install the Debian packages whose command (``commands[pkg]``, default the package
    name) is missing. Services are never started by the install (policy-rc.d)."""
    global _apt_updated
    commands = commands or {}
    missing = [p for p in packages if shutil.which(commands.get(p, p)) is None]
    if not missing:
        return
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    if not _apt_updated:
        run("apt-get", "update", env=env, timeout=600)
        _apt_updated = True
    policy = Path("/usr/sbin/policy-rc.d")
    added_policy = not policy.exists()
    if added_policy:  # keep apt from starting a system-wide dockerd
        policy.write_text("#!/bin/sh\nexit 101\n")
        policy.chmod(0o755)
    try:
        run("apt-get", "install", "-y", "--no-install-recommends", *missing, env=env, timeout=1200)
    finally:
        if added_policy:
            policy.unlink(missing_ok=True)


def debian_mirror() -> str:
    """The Debian archive this machine's apt uses (never a hard-coded host): the first
    ``deb`` source for a plain suite (not -security/-updates) in /etc/apt/sources.list*."""
    candidates: list[tuple[str, str]] = []  # (uri, suites)
    files = [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]
    for path in files:
        if not path.is_file():
            continue
        text = path.read_text(errors="replace")
        if path.suffix == ".sources":  # deb822 stanzas
            for stanza in re.split(r"\n\s*\n", text):
                fields = dict(re.findall(r"^(\w[\w-]*):\s*(.*)$", stanza, flags=re.M))
                if "deb" in fields.get("Types", "").split() and fields.get("Enabled", "yes") != "no":
                    for uri in fields.get("URIs", "").split():
                        candidates.append((uri, fields.get("Suites", "")))
        elif path.suffix == ".list" or path.name == "sources.list":
            for line in text.splitlines():
                m = re.match(r"^\s*deb\s+(?:\[[^]]*\]\s+)?(\S+)\s+(\S+)", line)
                if m:
                    candidates.append((m.group(1), m.group(2)))
    for uri, suites in candidates:
        names = suites.split()
        if any(s and "-" not in s and "/" not in s for s in names) and "security" not in uri:
            if any(s in ("bookworm", "stable") for s in names) or "debian" in uri:
                return uri.rstrip("/")
    raise RuntimeError("found no Debian mirror in /etc/apt/sources.list*; set P2PFM_DEBIAN_MIRROR")


def file_digest(*paths: Path, extra: str = "") -> str:
    """A short content hash of files (cache keys)."""
    import hashlib

    h = hashlib.sha256(extra.encode())
    for p in paths:
        h.update(p.name.encode())
        h.update(p.read_bytes())
    return h.hexdigest()[:16]
