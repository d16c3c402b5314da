"""An arm64 Debian root that runs on this x86-64 machine under qemu-user, with p2pfm in a venv.

Why: p2pfm peers are meant for Raspberry Pis and Jetsons, and CI has no arm64 hardware. This
root proves the arm64 install path (the per-platform torch pin, hivemind's aarch64 wheel with
its own ``p2pd``) and lets an arm64 ``p2pfm peer`` talk to native x86-64 peers on loopback:
a chroot shares the host's network namespace.

How (each pitfall of BRIEF.md section 5 has its step):

- :func:`ensure_qemu` installs ``qemu-user-static`` (+ binfmt-support, mmdebstrap, arch-test)
  if missing, mounts binfmt_misc if needed and checks that ``qemu-aarch64`` is registered
  with the F flag (the kernel opens the interpreter at registration, so the root needs no
  copy of it).
- :func:`base_tarball`: ``mmdebstrap --variant=extract`` of python3, python3-venv and
  ``libstdc++6`` (torch links it; the ``essential`` set lacks it) from this machine's Debian
  mirror, without emulated maintainer scripts (see the comment there). Bookworm's python is
  3.11, the version the cp311 wheels are for: :meth:`Arm64Root.check_python`.
- :func:`collect_wheels`: every wheel resolved *for the target* on the host. ``pip download
  --platform`` evaluates environment markers for the host (it would fetch x86 CUDA wheels for
  torch) and cannot fetch sdist-only packages, so :func:`resolve_wheels` walks the dependency
  graph itself: ``pip download --no-deps`` per level, each wheel's ``Requires-Dist`` evaluated
  with :data:`TARGET_ENV`, constraints.txt applied with the same markers (torch 2.10.0 on
  aarch64), and sdist-only pure-python packages (python-baseconv, prefetch_generator, varint;
  BRIEF.md also names morphys, which has a universal wheel by now) built natively with
  ``pip wheel`` (they are ``py3-none-any``).
- :meth:`Arm64Root.install` runs the root's own pip (emulated) with ``--no-index``: the
  target's resolver re-checks the set with the target's markers, so a missing wheel fails here.
  The bytecode is then compiled natively (emulated imports of uncompiled torch take a minute).
- :meth:`Arm64Root.popen` runs a command in the root: a private mount namespace (``unshare
  --mount``) with /proc, /sys, a small /dev and a fake ARM ``/proc/cpuinfo`` bind-mounted
  (qemu-user 7.2 shows the guest the host's x86 cpuinfo, and torch's cpuinfo parser segfaults
  on it), then ``chroot``, with ``HIVEMIND_MEMORY_SHARING_STRATEGY=file_descriptor`` (no
  emulated torch_shm_manager). The mounts live only as long as the processes that use them.
- :meth:`Arm64Root.kill_all` kills every process whose root is this root (hivemind's ``p2pd``
  children included) before its tmpfs is unmounted; :meth:`Arm64Root.close` does both.

The base root (tarball) and the dependency wheels are cached under ``CACHE_DIR`` keyed on
their inputs; p2pfm's own wheel is built fresh from this tree every time.

By hand (as root)::

    python tests/deploy/arm64root.py shell      # build (cached) and open a shell in the root
    python tests/deploy/arm64root.py run -- /opt/p2pfm/bin/p2pfm --version
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import tomllib
import zipfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from email.parser import Parser
from pathlib import Path

from hostenv import CACHE_DIR, REPO, Phases, apt_install, debian_mirror, file_digest, log, run
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name, parse_wheel_filename
from packaging.version import Version

SUITE = "bookworm"  # python3 3.11: the cp311 wheels
VENV = "/opt/p2pfm"  # inside the root
# Bookworm's glibc is 2.36: every manylinux tag up to it runs there. pip does not expand a
# ``manylinux_2_28`` --platform to older tags by itself, so all of them are listed.
PLATFORMS = ("manylinux2014_aarch64", *(f"manylinux_2_{minor}_aarch64" for minor in range(17, 37)))
# Environment markers as bookworm's python 3.11 on aarch64 Linux evaluates them.
TARGET_ENV: dict[str, str] = {
    "implementation_name": "cpython",
    "implementation_version": "3.11.2",
    "os_name": "posix",
    "platform_machine": "aarch64",
    "platform_python_implementation": "CPython",
    "platform_release": "",
    "platform_system": "Linux",
    "platform_version": "",
    "python_full_version": "3.11.2",
    "python_version": "3.11",
    "sys_platform": "linux",
    "extra": "",
}
# The resolver's own version: part of the wheel cache key, so a change here re-resolves.
RESOLVER_VERSION = "1"

FAKE_CPUINFO_CORE = """processor\t: {index}
BogoMIPS\t: 50.00
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp
CPU implementer\t: 0x41
CPU architecture: 8
CPU variant\t: 0x3
CPU part\t: 0xd0c
CPU revision\t: 1

"""


class Arm64Unavailable(RuntimeError):
    """This machine cannot run an arm64 root (not root, no qemu-user-static): a reason to skip."""


# --- the emulator ---------------------------------------------------------------------------
BINFMT = Path("/proc/sys/fs/binfmt_misc")


def ensure_qemu() -> None:
    """qemu-user-static registered for aarch64 ELF binaries, or :class:`Arm64Unavailable`."""
    if os.geteuid() != 0:
        raise Arm64Unavailable("an arm64 root needs root (binfmt_misc, chroot, mounts)")
    try:
        apt_install(
            ["qemu-user-static", "binfmt-support", "mmdebstrap", "arch-test"],
            commands={"qemu-user-static": "qemu-aarch64-static", "binfmt-support": "update-binfmts"},
        )
    except (RuntimeError, subprocess.TimeoutExpired) as exc:
        raise Arm64Unavailable(f"could not install qemu-user-static: {str(exc)[:500]}") from exc
    if not (BINFMT / "register").exists():
        run("mount", "-t", "binfmt_misc", "binfmt_misc", BINFMT)
    entry = BINFMT / "qemu-aarch64"
    if not entry.exists() or "enabled" not in entry.read_text():
        run("update-binfmts", "--enable", "qemu-aarch64", check=False)
    if not entry.exists():  # no binfmt-support service: register from the package's binfmt.d file
        conf = Path("/usr/lib/binfmt.d/qemu-aarch64.conf")
        if conf.exists():
            (BINFMT / "register").write_text(conf.read_text().strip())
    if not entry.exists():
        raise Arm64Unavailable("qemu-aarch64 is not registered in binfmt_misc")
    text = entry.read_text()
    flags = next((line.split(":", 1)[1] for line in text.splitlines() if line.startswith("flags:")), "")
    if "enabled" not in text or "F" not in flags:
        raise Arm64Unavailable(f"qemu-aarch64 binfmt entry unusable (needs enabled and flag F):\n{text}")


# --- the base root ---------------------------------------------------------------------------
# ``extract`` unpacks these packages and their dependencies without running any maintainer
# script: ~15 s instead of 170-280 s for ``essential``, whose scripts (py3compile of the whole
# standard library above all) run emulated. The hooks do the little those scripts would have
# done that python needs: mount points, a passwd file, the linker cache (ldconfig, emulated but
# quick) and the standard library's bytecode, compiled natively (same 3.11 bytecode; paths as
# the root sees them), without which every emulated start compiles what it imports.
ROOT_PACKAGES = ("dash", "coreutils", "libc-bin", "libstdc++6", "python3", "python3-venv")
_HOOKS = (
    'mkdir -p "$1/proc" "$1/sys" "$1/root" "$1/tmp" "$1/dev/shm" "$1/opt"',
    'echo "root:x:0:0:root:/root:/bin/sh" > "$1/etc/passwd"; echo "root:x:0:" > "$1/etc/group"',
    'chroot "$1" /sbin/ldconfig',
    f'{sys.executable} -m compileall -q -j 0 -s "$1" -p / "$1/usr/lib/python3.11" > /dev/null || true',
)


def base_tarball(phases: Phases) -> Path:
    """The arm64 bookworm root as a tarball, made with mmdebstrap once per mirror and package set."""
    mirror = os.environ.get("P2PFM_DEBIAN_MIRROR") or debian_mirror()
    key = file_digest(extra=json.dumps([SUITE, mirror, ROOT_PACKAGES, "extract", _HOOKS[:3], 2]))
    tarball = CACHE_DIR / f"arm64-root-{key}.tar"
    if tarball.exists():
        return tarball
    with phases("arm64: mmdebstrap root (cached afterwards)"):
        CACHE_DIR.mkdir(parents=True, exist_ok=True)
        for stale in CACHE_DIR.glob("arm64-root-*.tar"):
            stale.unlink()
        partial = CACHE_DIR / f".arm64-root-{key}.partial.tar"
        run(
            "mmdebstrap",
            "--variant=extract",
            "--architectures=arm64",
            f"--include={','.join(ROOT_PACKAGES)}",
            *(f"--extract-hook={hook}" for hook in _HOOKS),  # the extract variant runs no customize hooks
            SUITE,
            partial,
            mirror,
            timeout=1200,
        )
        partial.rename(tarball)
    return tarball


# --- wheels for the target --------------------------------------------------------------------
def _pip(*args: str | os.PathLike, timeout: float = 900, check: bool = True) -> subprocess.CompletedProcess:
    return run(sys.executable, "-m", "pip", *args, timeout=timeout, check=check)


def _platform_args() -> list[str]:
    args = ["--only-binary=:all:", "--python-version", "3.11", "--implementation", "cp", "--abi", "cp311"]
    for tag in PLATFORMS:
        args += ["--platform", tag]
    return args


def _wheel_requirements(wheel: Path) -> list[Requirement]:
    """The ``Requires-Dist`` lines of a wheel's METADATA."""
    with zipfile.ZipFile(wheel) as archive:
        name = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        metadata = Parser().parsestr(archive.read(name).decode("utf-8", "replace"))
    return [Requirement(line) for line in metadata.get_all("Requires-Dist") or []]


def applies(
    requirement: Requirement, extras: Iterable[str] = (), env: Mapping[str, str] = TARGET_ENV
) -> bool:
    """Whether ``requirement`` holds on the target, for a dependant that asked for ``extras``."""
    if requirement.marker is None:
        return True
    return any(requirement.marker.evaluate({**env, "extra": extra}) for extra in ("", *extras))


def target_constraints(path: Path, env: Mapping[str, str] = TARGET_ENV) -> dict[str, SpecifierSet]:
    """constraints.txt's pins that apply on the target (markers evaluated for it, not the host)."""
    pins: dict[str, SpecifierSet] = {}
    for raw in path.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        req = Requirement(line)
        if req.marker is None or req.marker.evaluate(dict(env)):
            name = canonicalize_name(req.name)
            pins[name] = pins.get(name, SpecifierSet()) & req.specifier
    return pins


@dataclass
class Resolution:
    """What :func:`resolve_wheels` chose: one wheel per distribution, and who asked for what."""

    wheels: dict[str, Path] = field(default_factory=dict)  # canonical name -> wheel file
    wanted: dict[str, list[tuple[str, Requirement]]] = field(default_factory=dict)  # name -> (by, req)

    def version(self, name: str) -> Version:
        return Version(str(parse_wheel_filename(self.wheels[name].name)[1]))

    def check(self) -> None:
        """Every requirement that applies on the target is met by the chosen versions."""
        problems = [
            f"{by} needs {req}, chose {self.version(name)}"
            for name, asks in self.wanted.items()
            for by, req in asks
            if not req.specifier.contains(self.version(name), prereleases=True)
        ]
        if problems:
            raise RuntimeError("aarch64 wheel set is inconsistent:\n  " + "\n  ".join(problems))


def _fetch(names: Mapping[str, SpecifierSet], dest: Path) -> dict[str, Path]:
    """aarch64 wheels for ``names`` (no dependencies), sdist-only pure-python ones built here."""
    staging = Path(tempfile.mkdtemp(prefix="stage-", dir=dest))
    try:
        specs = [f"{name}{spec}" for name, spec in sorted(names.items())]
        if _pip(
            "download", "--quiet", "--no-deps", *_platform_args(), "-d", staging, *specs, check=False
        ).returncode:
            for spec in specs:  # one of them has no binary wheel: find which, one at a time
                if _pip(
                    "download", "--quiet", "--no-deps", *_platform_args(), "-d", staging, spec, check=False
                ).returncode:
                    log(f"{spec}: no aarch64 wheel on the index; building it here (pure python only)")
                    _pip("wheel", "--quiet", "--no-deps", "-w", staging, spec)
        found: dict[str, Path] = {}
        for wheel in staging.glob("*.whl"):
            name, _, _, tags = parse_wheel_filename(wheel.name)
            if not any(t.platform == "any" or t.platform in PLATFORMS for t in tags):
                raise RuntimeError(f"{wheel.name} is neither pure python nor for aarch64")
            target = dest / wheel.name
            wheel.replace(target)
            found[canonicalize_name(name)] = target
        missing = set(names) - set(found)
        if missing:
            raise RuntimeError(f"pip fetched no wheel for {sorted(missing)}")
        return found
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def resolve_wheels(roots: Sequence[str], constraints: Mapping[str, SpecifierSet], dest: Path) -> Resolution:
    """Wheels for ``roots`` and everything they need on the target, level by level.

    The newest version allowed by the requirement seen first and by ``constraints`` is taken
    (pip's choice for a fresh install); :meth:`Resolution.check` then refuses a set in which a
    later dependant wants another version, rather than installing something pip would not.
    """
    result = Resolution()
    extras: dict[str, set[str]] = {}
    level = [("(root)", Requirement(r)) for r in roots]
    while level:
        todo: dict[str, SpecifierSet] = {}
        for by, req in level:
            name = canonicalize_name(req.name)
            result.wanted.setdefault(name, []).append((by, req))
            extras.setdefault(name, set()).update(req.extras)
            if name not in result.wheels:
                todo[name] = todo.get(name, constraints.get(name, SpecifierSet())) & req.specifier
        level = []
        for name, wheel in _fetch(todo, dest).items() if todo else ():
            result.wheels[name] = wheel
            level += [(name, r) for r in _wheel_requirements(wheel) if applies(r, extras.get(name, ()))]
    result.check()
    return result


def project_dependencies() -> list[str]:
    return list(tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"])


def collect_wheels(phases: Phases) -> Path:
    """A folder with p2pfm's wheel (fresh from this tree) and every aarch64 dependency wheel."""
    deps = project_dependencies()
    key = file_digest(REPO / "constraints.txt", extra=json.dumps([sorted(deps), RESOLVER_VERSION, PLATFORMS]))
    cached = CACHE_DIR / f"arm64-wheels-{key}"
    if not (cached / ".complete").exists():
        with phases("arm64: resolve + download aarch64 wheels (cached afterwards)"):
            for stale in CACHE_DIR.glob("arm64-wheels-*"):
                shutil.rmtree(stale, ignore_errors=True)
            cached.mkdir(parents=True)
            resolution = resolve_wheels(deps, target_constraints(REPO / "constraints.txt"), cached)
            (cached / "resolution.json").write_text(
                json.dumps({n: w.name for n, w in sorted(resolution.wheels.items())}, indent=1) + "\n"
            )
            (cached / ".complete").write_text(time.strftime("%F %T\n"))
    out = Path(tempfile.mkdtemp(prefix="p2pfm-arm64-wheels-"))
    for wheel in cached.glob("*.whl"):
        try:
            os.link(wheel, out / wheel.name)
        except OSError:
            shutil.copy2(wheel, out / wheel.name)
    with phases("arm64: pip wheel p2pfm"):
        _pip("wheel", "--quiet", "--no-deps", "-w", out, REPO, timeout=600)
    return out


# --- the root ---------------------------------------------------------------------------------
def fake_cpuinfo(cores: int) -> str:
    """An ARM Cortex-style /proc/cpuinfo with ``cores`` processors."""
    return "".join(FAKE_CPUINFO_CORE.format(index=i) for i in range(max(1, cores)))


# Runs as root on the host, in a fresh private mount namespace: mounts, then chroot.
_ENTER = r"""
set -eu
root="$1"; shift
mount -t proc proc "$root/proc"
mount --bind "$root/.host/cpuinfo" "$root/proc/cpuinfo"
mount -t sysfs sysfs "$root/sys"
mount -t tmpfs -o mode=1777 tmpfs "$root/dev/shm"
mount -t tmpfs -o mode=1777 tmpfs "$root/tmp"
exec chroot "$root" "$@"
"""

ENV = {
    "PATH": f"{VENV}/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME": "/root",
    "LANG": "C.UTF-8",
    "PYTHONUNBUFFERED": "1",
    "PYTHONDONTWRITEBYTECODE": "1",
    # hivemind shares tensors through torch's shm manager by default: a second emulated binary
    # that is slow to start; file descriptors need none.
    "HIVEMIND_MEMORY_SHARING_STRATEGY": "file_descriptor",
}


ROOT_TMPFS_SIZE = "4g"  # the installed root takes ~1.3 GB (torch alone ~0.9 GB)


class Arm64Root:
    """An unpacked arm64 root on a tmpfs of its own. ``close()`` kills what runs in it and unmounts it.

    A tmpfs, because deleting the installed root's ~20,000 files from this machine's shared
    disk took 70 s under load; an unmount takes none, and the emulated install writes faster.
    """

    def __init__(self, tarball: Path, parent: Path | None = None) -> None:
        self.path = Path(tempfile.mkdtemp(prefix="p2pfm-arm64-", dir=parent))
        run("mount", "-t", "tmpfs", "-o", f"size={ROOT_TMPFS_SIZE},mode=0755", "p2pfm-arm64", self.path)
        try:
            run("tar", "-C", self.path, "-xf", tarball, timeout=600)
        except BaseException:
            self.close()
            raise
        host = self.path / ".host"
        host.mkdir()
        (host / "cpuinfo").write_text(fake_cpuinfo(os.cpu_count() or 1))
        for name in ("urandom", "random", "null", "zero"):  # mmdebstrap makes them; check anyway
            if not (self.path / "dev" / name).exists():
                raise RuntimeError(f"arm64 root lacks /dev/{name}")

    def argv(self, command: Sequence[str], env: Mapping[str, str] | None = None) -> list[str]:
        """The host command line that runs ``command`` in the root with ``ENV`` (+ ``env``)."""
        variables = [f"{k}={v}" for k, v in {**ENV, **(env or {})}.items()]
        return [
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "/bin/sh",
            "-c",
            _ENTER,
            "enter",
            str(self.path),
            "/usr/bin/env",
            "-i",
            *variables,
            *command,
        ]

    def run(
        self, *command: str, timeout: float = 600, env: Mapping[str, str] | None = None, check: bool = True
    ) -> subprocess.CompletedProcess:
        log("arm64 $ " + " ".join(command))  # the host-side wrapper (argv) is the same every time
        return run(*self.argv(command, env), timeout=timeout, check=check, quiet=True)

    def popen(
        self, command: Sequence[str], log_path: Path, env: Mapping[str, str] | None = None
    ) -> subprocess.Popen:
        """Start ``command`` in the root in a new session (its own process group), output to ``log_path``."""
        with log_path.open("ab") as handle:
            return subprocess.Popen(
                self.argv(command, env),
                stdout=handle,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )

    def host_path(self, inside: str) -> Path:
        """Where a path of the root lies on the host."""
        return self.path / inside.lstrip("/")

    def resolve(self, inside: str) -> Path:
        """The host path of the file ``inside`` names, following symlinks as the root sees them
        (an absolute link target is inside the root, not on the host)."""
        path = inside
        for _ in range(40):
            host = self.host_path(path)
            if not host.is_symlink():
                return host
            target = os.readlink(host)
            path = target if target.startswith("/") else str(Path(path).parent / target)
        raise RuntimeError(f"too many links resolving {inside} in {self.path}")

    def check_python(self) -> str:
        """The root's python is Debian's 3.11 on aarch64 (the wheels are cp311): its version line."""
        out = self.run(
            "/usr/bin/python3",
            "-c",
            "import platform, sys; print(platform.machine(), sys.version.split()[0])",
        ).stdout.split()
        machine, version = out[0], out[1]
        if machine != "aarch64" or not version.startswith("3.11."):
            raise RuntimeError(f"arm64 root's python is {version} on {machine}; need 3.11 on aarch64")
        return f"{machine} python {version}"

    def install(self, wheels: Path) -> None:
        """A venv at ``VENV`` with p2pfm and its dependencies from ``wheels`` (no index), by the
        root's own pip: its resolver evaluates the markers as the target does."""
        self.run("/usr/bin/python3", "-m", "venv", VENV, timeout=600)
        inside = "/.host/wheels"
        shutil.copytree(wheels, self.host_path(inside), copy_function=_link_or_copy)
        try:
            self.run(
                f"{VENV}/bin/pip",
                "install",
                "--quiet",
                "--no-index",
                "--no-compile",
                "--disable-pip-version-check",
                "--find-links",
                inside,
                "p2pfm",
                timeout=1200,
            )
        finally:
            shutil.rmtree(self.host_path(inside), ignore_errors=True)
        # Natively: the same 3.11 bytecode, with the paths the root sees (-s strips, -p prepends).
        site = self.host_path(f"{VENV}/lib/python3.11/site-packages")
        run(
            sys.executable,
            "-m",
            "compileall",
            "-q",
            "-j",
            "0",
            "-s",
            self.path,
            "-p",
            "/",
            site,
            quiet=True,
            check=False,  # a few packages ship deliberately broken test files
            timeout=900,
        )

    def pids(self) -> list[int]:
        """Processes whose root directory is this root (a chroot's children included)."""
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                if os.readlink(entry / "root") == str(self.path):
                    found.append(int(entry.name))
            except OSError:
                continue
        return found

    def kill_all(self, timeout: float = 10.0) -> None:
        """SIGKILL every process running in the root, until none is left."""
        deadline = time.monotonic() + timeout
        while pids := self.pids():
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"processes {pids} in {self.path} survive SIGKILL")
            time.sleep(0.1)

    def close(self) -> None:
        """Kill what runs in the root, unmount its tmpfs (the mounts inside died with the
        processes' private namespaces), remove the empty mount point."""
        self.kill_all()
        run("umount", self.path, check=False, quiet=True)
        mounted = [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()]
        if any(m == str(self.path) or m.startswith(str(self.path) + "/") for m in mounted):
            raise RuntimeError(f"{self.path} is still mounted after killing everything in it")
        shutil.rmtree(self.path, ignore_errors=True)


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def build_root(phases: Phases, parent: Path | None = None) -> Arm64Root:
    """The whole preparation: qemu, the base root, the wheels, the venv. The caller closes it."""
    with phases("arm64: qemu-user-static (apt, if missing) + binfmt_misc"):
        ensure_qemu()
    tarball = base_tarball(phases)
    wheels = collect_wheels(phases)
    try:
        with phases("arm64: unpack root on a tmpfs"):
            root = Arm64Root(tarball, parent)
        try:
            with phases("arm64: check the root's python"):
                log(root.check_python())
            with phases("arm64: pip install p2pfm in the root (emulated)"):
                root.install(wheels)
        except BaseException:
            root.close()
            raise
    finally:
        shutil.rmtree(wheels, ignore_errors=True)
    return root


def main() -> None:
    """``shell``: build and open a shell in the root; ``run -- CMD``: build and run CMD in it."""
    args = sys.argv[1:]
    if not args or args[0] not in ("shell", "run"):
        raise SystemExit(__doc__)
    command = ["/bin/bash"] if args[0] == "shell" else [a for a in args[1:] if a != "--"]
    phases = Phases()
    root = build_root(phases)
    try:
        print(phases.table(), file=sys.stderr)
        subprocess.run(root.argv(command), check=False)
    finally:
        root.close()


if __name__ == "__main__":
    main()
