"""A private Docker engine, a local base image, and the p2pfm image, for the compose tests.

Nothing here needs a registry: the engine comes from Debian's docker.io package, the base
image from debootstrap (the machine's own Debian mirror), the wheels from pip on the host.

- :class:`Engine` runs ``dockerd --storage-driver=vfs --bridge=none --iptables=false`` with
  its own data-root, exec-root, pidfile and socket under a temp dir, so it never touches a
  system engine; ``stop()`` ends it and its containerd and removes the temp dir.
- :func:`base_image` debootstraps bookworm once (cached as a tarball) and imports it.
- :func:`collect_wheels` fills a cached folder with every dependency's wheel (keyed by
  pyproject.toml + constraints.txt) and builds a fresh p2pfm wheel each time.
- :func:`build_image` builds ``peers/Dockerfile`` from a small staged context (Dockerfile,
  entrypoint, wheels) with ``--network host`` and BuildKit when the client has it.
- :class:`Compose` drives ``peers/compose.yaml`` + ``compose.hostnet.yaml`` with whichever
  of ``docker compose`` (v2 plugin) or ``docker-compose`` (v1) works.

Run ``python tests/deploy/dockerenv.py`` (as root) to build the image by hand and print
the commands to use it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from hostenv import CACHE_DIR, REPO, Phases, apt_install, debian_mirror, file_digest, log, run

BASE_TAG = "p2pfm-base:local"
IMAGE_TAG = "p2pfm:deploy-test"
DEBIAN_SUITE = "bookworm"  # python3 is 3.11 there, the version the wheels are built for
BASE_PACKAGES = "python3,python3-venv,python3-pip,ca-certificates"


def install_engine() -> None:
    """Debian's engine, compose v1 and debootstrap, if missing (a fresh CI machine)."""
    apt_install(["docker.io", "docker-compose", "debootstrap"], commands={"docker.io": "dockerd"})
    if shutil.which("docker") is None:
        raise RuntimeError("docker.io is installed but no docker client is on PATH")


def docker_client() -> tuple[str, dict[str, str]]:
    """The docker CLI to use and the environment it needs for a BuildKit build.

    A client with the buildx plugin builds with BuildKit by itself. Debian's docker.io
    client (20.10) has BuildKit built in behind DOCKER_BUILDKIT=1. A newer client without
    buildx only has the legacy builder, which on the vfs driver copies the whole root file
    system at every Dockerfile step (10+ minutes instead of 2): prefer Debian's then.
    """
    default = shutil.which("docker") or "docker"
    if subprocess.run([default, "buildx", "version"], capture_output=True).returncode == 0:
        return default, {}
    for candidate in ("/usr/bin/docker", default):
        res = subprocess.run(
            [candidate, "version", "--format", "{{.Client.Version}}"], capture_output=True, text=True
        )
        major = res.stdout.strip().split(".")[0]
        if res.returncode in (0, 1) and major.isdigit() and int(major) < 23:
            return candidate, {"DOCKER_BUILDKIT": "1"}
    return default, {"DOCKER_BUILDKIT": "0"}


@dataclass
class Engine:
    """A dockerd of our own. Use as a context manager."""

    root: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="p2pfm-dockerd-")))
    process: subprocess.Popen | None = None

    @property
    def socket(self) -> Path:
        return self.root / "docker.sock"

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "DOCKER_HOST": f"unix://{self.socket}"}

    def __enter__(self) -> Engine:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self, timeout: float = 300) -> None:
        log_file = open(self.root / "dockerd.log", "ab")  # noqa: SIM115 (the engine keeps it)
        self.process = subprocess.Popen(
            [
                "dockerd",
                "--storage-driver=vfs",
                "--bridge=none",
                "--iptables=false",
                "--ip6tables=false",
                f"--data-root={self.root / 'data'}",
                f"--exec-root={self.root / 'exec'}",
                f"--pidfile={self.root / 'dockerd.pid'}",
                f"--host=unix://{self.socket}",
            ],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        log_file.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"dockerd exited with {self.process.returncode}:\n{self.log_tail()}")
            if self.socket.exists() and self.docker("version", check=False, quiet=True).returncode == 0:
                log(f"dockerd up (pid {self.process.pid}, root {self.root})")
                return
            time.sleep(0.5)
        raise RuntimeError(f"dockerd did not answer within {timeout:.0f} s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 30) -> str:
        path = self.root / "dockerd.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""

    def docker(
        self, *args: str, check: bool = True, timeout: float | None = 600, quiet: bool = False
    ) -> subprocess.CompletedProcess:
        return run("docker", *args, env=self.env, check=check, timeout=timeout, quiet=quiet)

    def stop(self) -> None:
        """Remove every container, stop dockerd (and its containerd), delete the temp dir."""
        if self.process is not None and self.process.poll() is None:
            ids = self.docker("ps", "-aq", check=False, quiet=True).stdout.split()
            if ids:
                self.docker("rm", "-f", *ids, check=False, timeout=300)
            try:
                os.killpg(self.process.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                pass
        if self.process is not None:
            # containerd and shims live in dockerd's session; none may outlive the test.
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.process.wait(10)
        unmount_under(self.root)
        shutil.rmtree(self.root, ignore_errors=True)
        log("dockerd stopped, its data removed")

    def volume_dir(self, name: str) -> Path:
        """Where a named volume's files are on this host (we own the engine)."""
        out = self.docker("volume", "inspect", "--format", "{{.Mountpoint}}", name, quiet=True).stdout
        return Path(out.strip())


def unmount_under(root: Path) -> None:
    """Lazily unmount every mount point at or below ``root``, deepest first."""
    prefix = str(root).rstrip("/") + "/"
    mounts = [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()]
    for point in sorted((m for m in mounts if (m + "/").startswith(prefix)), key=len, reverse=True):
        subprocess.run(["umount", "-l", point], capture_output=True)


def base_image(engine: Engine, phases: Phases) -> None:
    """Import the debootstrapped base image, making (and caching) its tarball if needed."""
    tarball = CACHE_DIR / f"base-{DEBIAN_SUITE}-minbase.tar"
    if not tarball.exists():
        with phases("debootstrap base image (cached afterwards)"):
            mirror = os.environ.get("P2PFM_DEBIAN_MIRROR") or debian_mirror()
            CACHE_DIR.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix="p2pfm-debootstrap-", dir=CACHE_DIR))
            try:
                rootfs = tmp / "root"
                run(
                    "debootstrap",
                    "--variant=minbase",
                    f"--include={BASE_PACKAGES}",
                    DEBIAN_SUITE,
                    rootfs,
                    mirror,
                    timeout=1800,
                )
                # apt lists and caches are dead weight in an image that never runs apt.
                for junk in ("var/cache/apt/archives", "var/lib/apt/lists"):
                    shutil.rmtree(rootfs / junk, ignore_errors=True)
                partial = tmp / "base.tar"
                run("tar", "-C", rootfs, "-cf", partial, ".")
                partial.rename(tarball)
            finally:
                # A failed debootstrap can leave proc/sys mounted in the chroot: never
                # delete through a mount.
                unmount_under(tmp)
                shutil.rmtree(tmp, ignore_errors=True)
    with phases("docker import base image"):
        run("docker", "import", tarball, BASE_TAG, env=engine.env, timeout=600)


def collect_wheels(phases: Phases) -> Path:
    """A folder with the wheels of p2pfm (fresh from this tree) and of all its dependencies."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    key = file_digest(REPO / "constraints.txt", extra=json.dumps(sorted(project.get("dependencies", []))))
    deps = CACHE_DIR / f"wheels-{key}"
    if not (deps / ".complete").exists():
        with phases("pip wheel dependencies (cached afterwards)"):
            for stale in CACHE_DIR.glob("wheels-*"):  # older dependency sets
                shutil.rmtree(stale, ignore_errors=True)
            deps.mkdir(parents=True)
            run(
                "python3",
                "-m",
                "pip",
                "wheel",
                "--quiet",
                "-w",
                deps,
                "-c",
                REPO / "constraints.txt",
                REPO,
                timeout=1800,
            )
            for own in deps.glob("p2pfm-*.whl"):
                own.unlink()
            (deps / ".complete").write_text(time.strftime("%F %T\n"))
    with phases("pip wheel p2pfm"):
        out = Path(tempfile.mkdtemp(prefix="p2pfm-wheels-"))
        for wheel in deps.glob("*.whl"):
            _link_or_copy(wheel, out / wheel.name)
        run("python3", "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", out, REPO, timeout=600)
    return out


def _link_or_copy(src: str | Path, dst: str | Path) -> None:
    """Hard link (free) when both sides share a file system, else copy."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def build_image(engine: Engine, wheels: Path, phases: Phases, tag: str = IMAGE_TAG) -> str:
    """Build peers/Dockerfile offline from ``wheels`` on the local base image."""
    with phases("docker build p2pfm image"), tempfile.TemporaryDirectory(prefix="p2pfm-context-") as ctx:
        context = Path(ctx)
        (context / "peers").mkdir()
        for name in ("Dockerfile", "entrypoint.sh"):
            shutil.copy2(REPO / "peers" / name, context / "peers" / name)
        shutil.copytree(wheels, context / "wheels", copy_function=_link_or_copy)
        client, extra_env = docker_client()
        log(f"building with {client} ({extra_env or 'buildx'})")
        run(
            client,
            "build",
            "--network",
            "host",
            "-f",
            "peers/Dockerfile",
            "--build-arg",
            f"BASE_IMAGE={BASE_TAG}",
            "--build-arg",
            "WHEELS_DIR=wheels",
            "-t",
            tag,
            ".",
            env={**engine.env, **extra_env},
            cwd=context,
            timeout=3600,
        )
    return tag


def compose_command(env: dict[str, str]) -> list[str]:
    """``docker compose`` if the v2 plugin answers, else ``docker-compose`` (v1 or v2)."""
    if subprocess.run(["docker", "compose", "version"], capture_output=True, env=env).returncode == 0:
        return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    raise RuntimeError("neither `docker compose` nor `docker-compose` is available")


@dataclass
class Compose:
    """One compose project on an :class:`Engine`, with the host-network override."""

    engine: Engine
    project: str
    settings: dict[str, str]  # P2PFM_* variables the compose file reads

    def __post_init__(self) -> None:
        self.base = compose_command(self.engine.env)
        # Creating a container on the vfs driver copies the whole image (1.4 GB): compose v1's
        # default 60 s HTTP timeout is too short on a busy machine.
        self.env = {**self.engine.env, "COMPOSE_HTTP_TIMEOUT": "900", **self.settings}

    def __call__(self, *args: str, check: bool = True, timeout: float = 900) -> subprocess.CompletedProcess:
        return run(
            *self.base,
            "-p",
            self.project,
            "-f",
            REPO / "peers" / "compose.yaml",
            "-f",
            REPO / "peers" / "compose.hostnet.yaml",
            *args,
            env=self.env,
            check=check,
            timeout=timeout,
            cwd=REPO / "peers",
        )

    def containers(self, service: str | None = None) -> list[str]:
        """Names of the project's containers (running or not), sorted, optionally of one service."""
        filters = ["--filter", f"label=com.docker.compose.project={self.project}"]
        if service:
            filters += ["--filter", f"label=com.docker.compose.service={service}"]
        out = self.engine.docker("ps", "-a", *filters, "--format", "{{.Names}}", quiet=True).stdout
        return sorted(out.split())

    def volume(self, name: str) -> Path:
        return self.engine.volume_dir(f"{self.project}_{name}")

    def logs(self, tail: int = 40) -> str:
        return self("logs", "--no-color", "--tail", str(tail), check=False).stdout

    def down(self) -> None:
        self("down", "--volumes", "--remove-orphans", "--timeout", "30", check=False)


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def main() -> None:
    """Build the image on a private engine, as the test does, and leave it running."""
    phases = Phases()
    with phases("install engine"):
        install_engine()
    engine = Engine()
    with phases("start dockerd"):
        engine.start()
    base_image(engine, phases)
    wheels = collect_wheels(phases)
    build_image(engine, wheels, phases)
    shutil.rmtree(wheels, ignore_errors=True)
    print(phases.table())
    print(
        f"engine left running: export DOCKER_HOST=unix://{engine.socket}; stop it with "
        f"kill {engine.process.pid if engine.process else '?'} and rm -rf {engine.root}"
    )


if __name__ == "__main__":
    main()
