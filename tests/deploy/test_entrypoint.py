"""peers/entrypoint.sh without Docker: a fake ``p2pfm`` on PATH records the command line the
entrypoint would exec. Fast and rootless, so these run in the default suite."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

ENTRYPOINT = Path(__file__).resolve().parents[2] / "peers" / "entrypoint.sh"
FAKE_P2PFM = """#!/bin/bash
python3 -c 'import json, sys; print(json.dumps(sys.argv[1:]))' "$@" >> "$FAKE_LOG"
sleep "${FAKE_SLEEP:-0}"
"""

pytestmark = pytest.mark.skipif(
    shutil.which("flock") is None or shutil.which("bash") is None, reason="needs bash and flock (util-linux)"
)


@pytest.fixture
def run_entrypoint(tmp_path: Path):
    """Run the entrypoint with only the given P2PFM_* variables; return (exit code, argv list, stderr)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "p2pfm").write_text(FAKE_P2PFM)
    (bin_dir / "p2pfm").chmod(0o755)
    log = tmp_path / "calls.jsonl"
    procs: list[subprocess.Popen] = []

    def env_for(settings: dict[str, str]) -> dict[str, str]:
        base = {k: v for k, v in os.environ.items() if not k.startswith("P2PFM_")}
        return {
            **base,
            "PATH": f"{bin_dir}:{base['PATH']}",
            "FAKE_LOG": str(log),
            "P2PFM_WORK_DIR_NOTE": str(tmp_path / "work-dir-note"),
            **settings,
        }

    def run(settings: dict[str, str], *args: str, background: bool = False):
        cmd = ["bash", str(ENTRYPOINT), *args]
        if background:
            proc = subprocess.Popen(
                cmd,
                env=env_for(settings),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
            procs.append(proc)
            return proc
        res = subprocess.run(cmd, env=env_for(settings), capture_output=True, text=True, timeout=60)
        calls = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
        return res.returncode, (calls[-1] if calls else None), res.stderr

    yield run
    for proc in procs:  # the fake daemon's `sleep` child too: the whole group
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


def flag(argv: list[str], name: str) -> list[str]:
    """The values following ``name`` up to the next flag."""
    i = argv.index(name)
    values = []
    for item in argv[i + 1 :]:
        if item.startswith("--"):
            break
        values.append(item)
    return values


def flock_held(path: Path) -> bool:
    """Whether some process holds a flock(2) on ``path``, read from /proc/locks without
    taking the lock (a probe that locked would itself race the entrypoint for the slot)."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return False
    ident = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    for line in Path("/proc/locks").read_text().splitlines():
        fields = line.split()  # "1: FLOCK  ADVISORY  WRITE <pid> <maj>:<min>:<inode> 0 EOF" (hex device)
        if len(fields) >= 6 and fields[1] == "FLOCK" and fields[5] == ident:
            return True
    return False


def write_status(path: Path, **fields) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"state": "training", **fields}))


def test_entrypoint_turns_p2pfm_variables_into_flags(run_entrypoint, tmp_path: Path):
    """P2PFM_NAME=value -> --name value; true -> bare flag; false/empty -> nothing; extra args last."""
    code, argv, _ = run_entrypoint(
        {
            "P2PFM_WORK_DIR": str(tmp_path / "w"),
            "P2PFM_ROUNDS": "5",
            "P2PFM_RUN_ID": "r1",
            "P2PFM_SOME_SWITCH": "true",
            "P2PFM_OFF_SWITCH": "false",
            "P2PFM_EMPTY": "",
            "P2PFM_EXTRA_ARGS": "--n-layer 2",
            "P2PFM_INITIAL_PEERS": "/ip4/1.2.3.4/tcp/1/p2p/A,/ip4/1.2.3.4/tcp/2/p2p/B",
        },
        "--lr",
        "0.1",
    )
    assert code == 0
    assert argv[:5] == ["peer", "--key", str(tmp_path / "w" / "peer.key"), "--work-dir", str(tmp_path / "w")]
    assert flag(argv, "--rounds") == ["5"] and flag(argv, "--run-id") == ["r1"]
    assert "--some-switch" in argv and "--off-switch" not in argv and "--empty" not in argv
    assert flag(argv, "--initial-peers") == ["/ip4/1.2.3.4/tcp/1/p2p/A", "/ip4/1.2.3.4/tcp/2/p2p/B"]
    assert argv[-4:] == ["--n-layer", "2", "--lr", "0.1"]
    assert not any(a.startswith(("--work-dir-note", "--extra-args")) for a in argv)


def test_entrypoint_gives_concurrent_replicas_their_own_slots(run_entrypoint, tmp_path: Path):
    """Two replicas on one volume get slot-0 and slot-1; a restarted one gets its slot back."""
    data = tmp_path / "data"
    first = run_entrypoint({"P2PFM_DATA": str(data), "FAKE_SLEEP": "600"}, background=True)
    lock = data / "slot-0" / ".lock"
    deadline = time.monotonic() + 60
    while not flock_held(lock):  # the event the second replica depends on
        assert first.poll() is None, f"the first replica exited ({first.returncode}) before locking slot-0"
        assert time.monotonic() < deadline, "the first replica did not lock slot-0 within 60 s"
        time.sleep(0.05)
    code, argv, _ = run_entrypoint({"P2PFM_DATA": str(data)})
    assert code == 0 and flag(argv, "--work-dir") == [str(data / "slot-1")]
    code, argv, _ = run_entrypoint({"P2PFM_DATA": str(data)})  # slot-1 is free again
    assert flag(argv, "--work-dir") == [str(data / "slot-1")]
    assert first.poll() is None  # still holding slot-0 all along


def test_entrypoint_joins_the_first_peer_at_its_host_with_its_libp2p_id(run_entrypoint, tmp_path: Path):
    """The /p2p/ part is the libp2p id from the first peer's status.json, not its p2pfm peer id."""
    write_status(
        tmp_path / "first" / "status.json",
        peer_id="p2pfm1abc",
        libp2p_id="12D3KooWFirst",
        maddrs=["/ip4/172.18.0.2/tcp/7000/p2p/12D3KooWFirst"],
    )
    code, argv, _ = run_entrypoint(
        {
            "P2PFM_DATA": str(tmp_path / "data"),
            "P2PFM_BOOTSTRAP_FILE": str(tmp_path / "first" / "status.json"),
            "P2PFM_BOOTSTRAP_HOST": "127.0.0.1",
            "P2PFM_BOOTSTRAP_PORT": "7123",
        }
    )
    assert code == 0
    assert flag(argv, "--initial-peers") == ["/ip4/127.0.0.1/tcp/7123/p2p/12D3KooWFirst"]


def test_entrypoint_without_a_live_first_peer_joins_live_siblings(run_entrypoint, tmp_path: Path):
    """First peer gone ("left"): join through the other replicas' status files, not our own."""
    data = tmp_path / "data"
    write_status(tmp_path / "first" / "status.json", libp2p_id="12D3KooWFirst", state="left")
    write_status(data / "slot-1" / "status.json", libp2p_id="S1", maddrs=["/ip4/127.0.0.1/tcp/4001/p2p/S1"])
    write_status(
        data / "slot-2" / "status.json",
        libp2p_id="S2",
        maddrs=["/ip4/127.0.0.1/tcp/4002/p2p/S2"],
        state="left",
    )
    code, argv, _ = run_entrypoint(
        {
            "P2PFM_DATA": str(data),
            "P2PFM_BOOTSTRAP_FILE": str(tmp_path / "first" / "status.json"),
            "P2PFM_BOOTSTRAP_GLOB": f"{data}/slot-*/status.json",
        }
    )
    assert code == 0
    assert flag(argv, "--work-dir") == [str(data / "slot-0")]
    assert flag(argv, "--initial-peers") == ["/ip4/127.0.0.1/tcp/4001/p2p/S1"]


def test_entrypoint_gives_up_when_no_peer_is_live(run_entrypoint, tmp_path: Path):
    """A joiner with nobody to join exits non-zero (the restart policy tries again later)."""
    write_status(tmp_path / "first" / "status.json", libp2p_id="12D3KooWFirst", state="left")
    code, argv, err = run_entrypoint(
        {
            "P2PFM_DATA": str(tmp_path / "data"),
            "P2PFM_BOOTSTRAP_TIMEOUT": "1",
            "P2PFM_BOOTSTRAP_FILE": str(tmp_path / "first" / "status.json"),
        }
    )
    assert code == 2 and argv is None and "no live peer" in err


def test_entrypoint_first_peer_with_nobody_around_starts_a_new_swarm(run_entrypoint, tmp_path: Path):
    """Only a glob and no live sibling: no --initial-peers at all."""
    code, argv, err = run_entrypoint(
        {
            "P2PFM_WORK_DIR": str(tmp_path / "first"),
            "P2PFM_BOOTSTRAP_GLOB": f"{tmp_path}/data/slot-*/status.json",
        }
    )
    assert code == 0 and "--initial-peers" not in argv and "new swarm" in err


def test_entrypoint_health_follows_status_json_age(run_entrypoint, tmp_path: Path):
    """health: fails before status.json exists, passes while fresh, fails once stale."""
    work = tmp_path / "w"
    run_entrypoint({"P2PFM_WORK_DIR": str(work)})
    assert run_entrypoint({}, "health")[0] == 1
    write_status(work / "status.json", libp2p_id="X")
    assert run_entrypoint({}, "health")[0] == 0
    old = time.time() - 3600
    os.utime(work / "status.json", (old, old))
    assert run_entrypoint({"P2PFM_HEALTH_MAX_AGE": "600"}, "health")[0] == 1


def test_entrypoint_admits_its_peer_with_the_swarms_authority(run_entrypoint, tmp_path: Path):
    """P2PFM_AUTHORITY_KEY: the authority key is made once, the peer's key certified with it, and the
    daemon runs with --authority/--cert; the certificate really admits the peer (real `p2pfm admit`)."""
    import sys

    from p2pfm.core.admission import Admission
    from p2pfm.core.identity import Identity

    real = f'[ "$1" = peer ] || exec {sys.executable} -m p2pfm "$@"\n'
    fake = tmp_path / "bin" / "p2pfm"
    fake.write_text(FAKE_P2PFM.replace("#!/bin/bash\n", "#!/bin/bash\n" + real))
    authority = tmp_path / "auth" / "authority.key"
    settings = {
        "P2PFM_WORK_DIR": str(tmp_path / "w"),
        "P2PFM_RUN_ID": "r1",
        "P2PFM_AUTHORITY_KEY": str(authority),
    }
    code, argv, err = run_entrypoint(settings)
    assert code == 0, err
    authority_id = Identity.load(authority).peer_id
    assert flag(argv, "--authority") == [authority_id] and flag(argv, "--cert") == [
        str(tmp_path / "w" / "peer.cert")
    ]
    peer_id = Identity.load(tmp_path / "w" / "peer.key").peer_id
    assert Admission("r1", authority_id).check(
        peer_id, (tmp_path / "w" / "peer.cert").read_bytes(), time.time()
    )
    code, again, _ = run_entrypoint(settings)  # a restart keeps both keys
    assert code == 0 and flag(again, "--authority") == [authority_id]
    assert Identity.load(tmp_path / "w" / "peer.key").peer_id == peer_id
    code, opened, _ = run_entrypoint({**settings, "P2PFM_OPEN": "true"})
    assert code == 0 and "--open" in opened and "--authority" not in opened
