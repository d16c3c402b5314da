"""Ed25519 identities: peer ids, signatures and key files (mode 0600, atomic writes)."""

import base64
import hashlib
import os
import stat

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from p2pfm.config import ConfigError
from p2pfm.core.identity import Identity, peer_id_from_public_key, verify_signature

SEED = bytes(range(32))


def mode_of(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_peer_id_follows_the_documented_derivation():
    """peer id = "p2pfm1" + base32-lower(SHA-256(b"p2pfm-peer-id-v1" + pk)[:20]), unpadded."""
    pk = Identity.from_private_bytes(SEED).public_key_bytes
    digest = hashlib.sha256(b"p2pfm-peer-id-v1" + pk).digest()[:20]
    expected = "p2pfm1" + base64.b32encode(digest).decode().lower()
    assert peer_id_from_public_key(pk) == expected
    assert len(expected) == 38 and "=" not in expected


def test_peer_id_rejects_wrong_public_key_length():
    """A public key that is not 32 bytes has no peer id."""
    with pytest.raises(ValueError):
        peer_id_from_public_key(b"\x00" * 31)


def test_distinct_keys_have_distinct_peer_ids():
    """Two generated identities get different public keys and peer ids."""
    a, b = Identity.generate(), Identity.generate()
    assert a.public_key_bytes != b.public_key_bytes
    assert a.peer_id != b.peer_id


def test_sign_then_verify_round_trips():
    """A signature verifies for its data and key only."""
    ident = Identity.from_private_bytes(SEED)
    sig = ident.sign(b"hello")
    assert len(sig) == 64
    assert verify_signature(ident.public_key_bytes, sig, b"hello")
    assert not verify_signature(ident.public_key_bytes, sig, b"hellO")
    assert not verify_signature(Identity.generate().public_key_bytes, sig, b"hello")


def test_verify_signature_returns_false_for_malformed_inputs():
    """Bad lengths or garbage keys make verification fail, never raise."""
    ident = Identity.from_private_bytes(SEED)
    sig = ident.sign(b"x")
    assert not verify_signature(ident.public_key_bytes[:31], sig, b"x")
    assert not verify_signature(ident.public_key_bytes, sig[:63], b"x")
    assert not verify_signature(b"\xff" * 32, sig, b"x")


def test_signatures_are_deterministic():
    """Ed25519 signs deterministically, which the golden vectors rely on."""
    ident = Identity.from_private_bytes(SEED)
    assert ident.sign(b"m") == ident.sign(b"m")


def test_from_private_bytes_round_trips_and_checks_length():
    """The raw 32-byte seed rebuilds the same identity; other lengths are refused."""
    ident = Identity.generate()
    assert Identity.from_private_bytes(ident.private_bytes()).peer_id == ident.peer_id
    with pytest.raises(ValueError):
        Identity.from_private_bytes(b"\x00" * 31)


def test_repr_never_shows_the_private_key():
    """repr names the peer id only."""
    ident = Identity.from_private_bytes(SEED)
    assert ident.peer_id in repr(ident)
    assert SEED.hex() not in repr(ident)


def test_save_writes_pem_with_mode_0600(tmp_path):
    """save() writes a PKCS#8 PEM readable only by its owner."""
    path = tmp_path / "peer.key"
    Identity.from_private_bytes(SEED).save(path)
    assert mode_of(path) == 0o600
    assert path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")


def test_save_is_0600_even_under_a_permissive_umask(tmp_path):
    """A umask of 000 does not widen the key file's mode."""
    old = os.umask(0)
    try:
        Identity.generate().save(tmp_path / "k")
    finally:
        os.umask(old)
    assert mode_of(tmp_path / "k") == 0o600


def test_save_then_load_round_trips(tmp_path):
    """A saved key loads back to the same identity."""
    ident = Identity.generate()
    ident.save(tmp_path / "k")
    assert Identity.load(tmp_path / "k").peer_id == ident.peer_id


def test_save_refuses_to_overwrite_without_force(tmp_path):
    """An existing key file is kept unless force=True."""
    path = tmp_path / "k"
    first = Identity.generate()
    first.save(path)
    with pytest.raises(ConfigError, match="already exists"):
        Identity.generate().save(path)
    assert Identity.load(path).peer_id == first.peer_id


def test_save_with_force_replaces_the_key(tmp_path):
    """force=True replaces the file, still with mode 0600."""
    path = tmp_path / "k"
    Identity.generate().save(path)
    second = Identity.generate()
    second.save(path, force=True)
    assert Identity.load(path).peer_id == second.peer_id
    assert mode_of(path) == 0o600


def test_save_leaves_no_temporary_files(tmp_path):
    """Only the key itself remains after saves, refused saves and forced saves."""
    path = tmp_path / "k"
    Identity.generate().save(path)
    with pytest.raises(ConfigError):
        Identity.generate().save(path)
    Identity.generate().save(path, force=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k"]


def test_save_into_missing_directory_names_the_path(tmp_path):
    """A missing parent directory is a ConfigError naming it."""
    with pytest.raises(ConfigError, match="does not exist"):
        Identity.generate().save(tmp_path / "nope" / "k")


def test_load_missing_file_names_the_path(tmp_path):
    """A missing key file is a ConfigError naming the path and how to create one."""
    path = tmp_path / "absent.key"
    with pytest.raises(ConfigError, match="absent.key does not exist.*keygen"):
        Identity.load(path)


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660, 0o602, 0o610])
def test_load_refuses_key_accessible_by_group_or_others(tmp_path, mode):
    """Any group/other permission bit is refused with a chmod 600 hint."""
    path = tmp_path / "k"
    Identity.generate().save(path)
    os.chmod(path, mode)
    with pytest.raises(ConfigError, match=r"chmod 600") as info:
        Identity.load(path)
    assert str(path) in str(info.value) and f"{mode:04o}" in str(info.value)


def test_load_accepts_mode_0400(tmp_path):
    """A read-only owner-only key (0400) is fine."""
    path = tmp_path / "k"
    Identity.generate().save(path)
    os.chmod(path, 0o400)
    Identity.load(path)


def _write_private(path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)


def test_load_rejects_a_file_that_is_not_pem(tmp_path):
    """Garbage in a key file is a ConfigError naming the path and the expected format."""
    path = tmp_path / "k"
    _write_private(path, b"not a key\n")
    with pytest.raises(ConfigError, match=r"k is not a PEM PKCS#8 private key"):
        Identity.load(path)


def test_load_rejects_keys_that_are_not_ed25519(tmp_path):
    """An EC (P-256) PKCS#8 key is refused as not Ed25519."""
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    path = tmp_path / "k"
    _write_private(path, pem)
    with pytest.raises(ConfigError, match="not Ed25519"):
        Identity.load(path)


def test_load_rejects_encrypted_keys(tmp_path):
    """A passphrase-protected key is refused with a clear message."""
    ident = Identity.generate()
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    pem = Ed25519PrivateKey.from_private_bytes(ident.private_bytes()).private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret"),
    )
    path = tmp_path / "k"
    _write_private(path, pem)
    with pytest.raises(ConfigError, match="encrypted"):
        Identity.load(path)


def test_load_rejects_a_directory(tmp_path):
    """A directory is not a key file."""
    (tmp_path / "d").mkdir(mode=0o700)
    with pytest.raises(ConfigError, match="not a regular file"):
        Identity.load(tmp_path / "d")


def test_peer_id_of_the_wire_md_example_is_pinned():
    """The example in protocols/wire.md (seed 00..1f) keeps its documented peer id."""
    assert Identity.from_private_bytes(SEED).peer_id == "p2pfm1rvctzzdmvkxtmn3q7r4sjyez7qgxuzw6"
