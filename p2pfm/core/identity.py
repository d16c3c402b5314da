"""Ed25519 identities, peer ids and PEM key files.

A peer is its Ed25519 key pair. Its **peer id** is derived from the 32-byte public key
(see :func:`peer_id_from_public_key` and ``protocols/wire.md``), so anybody holding a
signed envelope can name its sender without a directory.

Key files are PEM PKCS#8, unencrypted, mode 0600. Loading refuses files that group or
others may access (like ssh does), and every problem with a key file is a
:class:`~p2pfm.config.ConfigError` naming the path: the file is user input, not wire input.
"""

from __future__ import annotations

import base64
import hashlib
import os
import secrets
import stat
from pathlib import Path

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from p2pfm.config import ConfigError

PUBLIC_KEY_BYTES = 32
SIGNATURE_BYTES = 64
PEER_ID_PREFIX = "p2pfm1"
_PEER_ID_DOMAIN = b"p2pfm-peer-id-v1"
_MAX_KEY_FILE_BYTES = 64 * 1024  # a PEM Ed25519 key is ~120 bytes; refuse to slurp anything huge


def peer_id_from_public_key(public_key: bytes) -> str:
    """``"p2pfm1"`` + base32 (lowercase, unpadded) of SHA-256(b"p2pfm-peer-id-v1" + pk)[:20].

    20 bytes (160 bits) encode to exactly 32 base32 characters, so ids are 38 characters,
    case-insensitive and safe in file names, URLs and DNS labels.
    """
    if not isinstance(public_key, bytes) or len(public_key) != PUBLIC_KEY_BYTES:
        raise ValueError(f"public key must be {PUBLIC_KEY_BYTES} bytes")
    digest = hashlib.sha256(_PEER_ID_DOMAIN + public_key).digest()[:20]
    return PEER_ID_PREFIX + base64.b32encode(digest).decode("ascii").lower()


def verify_signature(public_key_bytes: bytes, signature: bytes, data: bytes) -> bool:
    """True iff ``signature`` is a valid Ed25519 signature of ``data`` by that public key.

    Never raises for bad input: a malformed key or signature simply does not verify.
    """
    if len(public_key_bytes) != PUBLIC_KEY_BYTES or len(signature) != SIGNATURE_BYTES:
        return False
    try:
        Ed25519PublicKey.from_public_bytes(bytes(public_key_bytes)).verify(bytes(signature), data)
    except (InvalidSignature, ValueError):
        return False
    return True


class Identity:
    """An Ed25519 private key with its public key and peer id. ``repr`` never shows the key."""

    __slots__ = ("_private", "_public_bytes", "_peer_id")

    def __init__(self, private_key: Ed25519PrivateKey) -> None:
        if not isinstance(private_key, Ed25519PrivateKey):
            raise TypeError(f"expected an Ed25519PrivateKey, got {type(private_key).__name__}")
        self._private = private_key
        self._public_bytes = private_key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        self._peer_id = peer_id_from_public_key(self._public_bytes)

    @classmethod
    def generate(cls) -> Identity:
        """A fresh key from the operating system's CSPRNG."""
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def from_private_bytes(cls, private_bytes: bytes) -> Identity:
        """From the 32-byte raw Ed25519 seed (as returned by :meth:`private_bytes`)."""
        if len(private_bytes) != 32:
            raise ValueError(f"an Ed25519 private key is 32 bytes, got {len(private_bytes)}")
        return cls(Ed25519PrivateKey.from_private_bytes(bytes(private_bytes)))

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Identity:
        """Read a PEM PKCS#8 Ed25519 key file that only its owner can access (mode 0600)."""
        path = Path(path)
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            raise ConfigError(
                f"key file {path} does not exist (create one with `p2pfm keygen --out {path}`)"
            ) from None
        except OSError as exc:
            raise ConfigError(f"key file {path} cannot be opened: {exc.strerror or exc}") from None
        try:
            # fstat the open file, not the path, so the mode we check is the file we read.
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise ConfigError(f"key file {path} is not a regular file")
            if os.name == "posix" and info.st_mode & 0o077:
                raise ConfigError(
                    f"key file {path} is accessible by group or others "
                    f"(mode {stat.S_IMODE(info.st_mode):04o}); a private key must be mode 0600: "
                    f"run `chmod 600 {path}`"
                )
            data = os.read(fd, _MAX_KEY_FILE_BYTES + 1)
        finally:
            os.close(fd)
        if len(data) > _MAX_KEY_FILE_BYTES:
            raise ConfigError(f"key file {path} is too large to be an Ed25519 PEM key")
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except TypeError:
            raise ConfigError(
                f"key file {path} is encrypted; p2pfm needs an unencrypted PKCS#8 PEM key"
            ) from None
        except (ValueError, UnsupportedAlgorithm):
            raise ConfigError(
                f"key file {path} is not a PEM PKCS#8 private key (expected "
                "'-----BEGIN PRIVATE KEY-----', as written by `p2pfm keygen`)"
            ) from None
        if not isinstance(key, Ed25519PrivateKey):
            raise ConfigError(f"key file {path} holds a {type(key).__name__.lstrip('_')} key, not Ed25519")
        return cls(key)

    def save(self, path: str | os.PathLike[str], *, force: bool = False) -> None:
        """Write the key as PEM PKCS#8 with mode 0600, atomically.

        The bytes go to a fresh temporary file in the same directory (O_CREAT|O_EXCL, mode
        0600, fsync), which then replaces ``path`` in one step: a crash never leaves a
        truncated key. Without ``force`` an existing ``path`` is never overwritten (the final
        step is a hard link, which fails if the name exists).
        """
        path = Path(path)
        directory = path.parent
        if not directory.is_dir():
            raise ConfigError(f"cannot write key file {path}: directory {directory} does not exist")
        if not force and (path.exists() or path.is_symlink()):
            raise ConfigError(f"key file {path} already exists; refusing to overwrite (use --force)")
        pem = self._private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        tmp = directory / f".{path.name}.tmp-{secrets.token_hex(8)}"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except OSError as exc:
            raise ConfigError(f"cannot write key file {path}: {exc.strerror or exc}") from None
        try:
            try:
                os.fchmod(fd, 0o600)  # the umask may only remove bits, but be explicit
                os.write(fd, pem)
                os.fsync(fd)
            finally:
                os.close(fd)
            self._publish(tmp, path, force)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        _fsync_directory(directory)

    @staticmethod
    def _publish(tmp: Path, path: Path, force: bool) -> None:
        """Move the finished temp file to ``path``; without force, never replace a file."""
        if force:
            os.replace(tmp, path)
            return
        try:
            os.link(tmp, path)
        except FileExistsError:
            raise ConfigError(
                f"key file {path} already exists; refusing to overwrite (use --force)"
            ) from None
        except OSError:
            # No hard links on this filesystem: fall back to rename after the check above.
            if path.exists():
                raise ConfigError(
                    f"key file {path} already exists; refusing to overwrite (use --force)"
                ) from None
            os.replace(tmp, path)
            return
        tmp.unlink()

    @property
    def public_key_bytes(self) -> bytes:
        """The 32-byte raw Ed25519 public key (the envelope's ``sender`` field)."""
        return self._public_bytes

    @property
    def peer_id(self) -> str:
        return self._peer_id

    def private_bytes(self) -> bytes:
        """The 32-byte raw private seed. Handle with care: this is the whole identity."""
        return self._private.private_bytes(
            serialization.Encoding.Raw,
            serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )

    def sign(self, data: bytes) -> bytes:
        """The 64-byte Ed25519 signature of ``data`` (deterministic, RFC 8032)."""
        return self._private.sign(data)

    def __repr__(self) -> str:
        return f"Identity(peer_id={self._peer_id!r})"


def _fsync_directory(directory: Path) -> None:
    """Make the rename durable; some platforms cannot open directories, which is fine."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
