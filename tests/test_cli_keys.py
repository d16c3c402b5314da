"""`p2pfm keygen` and `p2pfm id`: key files with mode 0600, no silent overwrite, matching ids."""

import os
import stat
import subprocess
import sys

from p2pfm.cli import main
from p2pfm.core.identity import Identity


def test_keygen_writes_a_0600_key_and_prints_its_peer_id(tmp_path, capsys):
    """keygen writes the key with mode 0600 and prints exactly the peer id on stdout."""
    path = tmp_path / "peer.key"
    assert main(["keygen", "--out", str(path)]) == 0
    peer_id = capsys.readouterr().out.strip()
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert peer_id == Identity.load(path).peer_id
    assert peer_id.startswith("p2pfm1")


def test_keygen_refuses_to_overwrite_without_force(tmp_path, capsys):
    """A second keygen to the same path fails with exit 2 and keeps the first key."""
    path = tmp_path / "peer.key"
    main(["keygen", "--out", str(path)])
    first = Identity.load(path).peer_id
    capsys.readouterr()
    assert main(["keygen", "--out", str(path)]) == 2
    err = capsys.readouterr().err
    assert "p2pfm: error:" in err and "already exists" in err and "--force" in err
    assert Identity.load(path).peer_id == first


def test_keygen_force_replaces_the_key(tmp_path, capsys):
    """--force writes a new key over the old one."""
    path = tmp_path / "peer.key"
    main(["keygen", "--out", str(path)])
    first = capsys.readouterr().out.strip()
    assert main(["keygen", "--out", str(path), "--force"]) == 0
    second = capsys.readouterr().out.strip()
    assert second != first and Identity.load(path).peer_id == second


def test_id_prints_the_same_peer_id_as_keygen(tmp_path, capsys):
    """`p2pfm id PATH` matches what keygen printed."""
    path = tmp_path / "peer.key"
    main(["keygen", "--out", str(path)])
    printed = capsys.readouterr().out.strip()
    assert main(["id", str(path)]) == 0
    assert capsys.readouterr().out.strip() == printed


def test_id_refuses_a_world_readable_key(tmp_path, capsys):
    """`p2pfm id` on a 0644 key exits 2 and says to chmod 600."""
    path = tmp_path / "peer.key"
    main(["keygen", "--out", str(path)])
    os.chmod(path, 0o644)
    capsys.readouterr()
    assert main(["id", str(path)]) == 2
    assert "chmod 600" in capsys.readouterr().err


def test_id_of_a_missing_file_is_a_clear_error(tmp_path, capsys):
    """A missing key file exits 2 naming the path."""
    path = tmp_path / "absent.key"
    assert main(["id", str(path)]) == 2
    assert f"{path} does not exist" in capsys.readouterr().err


def test_keygen_and_id_work_as_a_program(tmp_path):
    """The installed entry point (python -m p2pfm) runs keygen and id end to end."""
    path = tmp_path / "peer.key"
    run = [sys.executable, "-m", "p2pfm"]
    made = subprocess.run([*run, "keygen", "--out", str(path)], capture_output=True, text=True, timeout=120)
    assert made.returncode == 0, made.stderr
    shown = subprocess.run([*run, "id", str(path)], capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0 and shown.stdout == made.stdout
