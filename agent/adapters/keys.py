"""Ed25519 key files: load the vehicle's private key, load trusted public keys, generate pairs.

Private keys are PKCS#8 PEM, unencrypted (the agent starts unattended), and must not be
accessible by group or others. Public keys are SubjectPublicKeyInfo PEM.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from agent.adapters.atomic import atomic_write
from agent.core.cose import kid_of
from agent.errors import SigningError

__all__ = ["generate_keypair", "load_private_key", "load_public_key"]

_PEM_START = "-----BEGIN"


def load_private_key(path: str | os.PathLike[str]) -> Ed25519PrivateKey:
    """Load an unencrypted PKCS#8 PEM Ed25519 private key, refusing group/other access."""
    path = Path(path)
    try:
        # Open first, then fstat the open file: the mode checked is the mode of what is read.
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        raise SigningError(
            f"private key {path} not found; create one with "
            f"`tcu-agent keys generate --dir {path.parent}` (writes vehicle.key and vehicle.pub)"
        ) from None
    except OSError as exc:
        raise SigningError(f"cannot open private key {path}: {exc.strerror or exc}") from None
    try:
        with os.fdopen(fd, "rb") as handle:
            mode = os.fstat(handle.fileno()).st_mode
            if not stat.S_ISREG(mode):
                raise SigningError(f"private key {path} is not a regular file")
            if mode & 0o077:
                raise SigningError(
                    f"private key {path} is accessible by group or others "
                    f"(mode {mode & 0o777:04o}); run `chmod 600 {path}`"
                )
            data = handle.read()
    except OSError as exc:
        raise SigningError(f"cannot read private key {path}: {exc.strerror or exc}") from None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        # cryptography raises TypeError for an encrypted key read without a password.
        raise SigningError(f"private key {path} is encrypted; the agent needs an unencrypted PKCS#8 PEM key") from None
    except (ValueError, UnsupportedAlgorithm):
        raise SigningError(f"private key {path} is not a PKCS#8 PEM private key") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise SigningError(f"private key {path} is not an Ed25519 key ({type(key).__name__})")
    return key


def load_public_key(path_or_pem: str | os.PathLike[str]) -> Ed25519PublicKey:
    """Load an Ed25519 public key from a SubjectPublicKeyInfo PEM file or inline PEM text.

    Text starting with "-----BEGIN" (after leading whitespace) is taken as the PEM itself,
    so a trust store can embed keys directly.
    """
    if isinstance(path_or_pem, str) and path_or_pem.lstrip().startswith(_PEM_START):
        where, data = "inline public key", path_or_pem.strip().encode("ascii", "replace")
    else:
        path = Path(path_or_pem)
        where = f"public key {path}"
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise SigningError(f"{where} not found") from None
        except OSError as exc:
            raise SigningError(f"cannot read {where}: {exc.strerror or exc}") from None
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, UnsupportedAlgorithm):
        raise SigningError(f"{where} is not a SubjectPublicKeyInfo PEM public key") from None
    if not isinstance(key, Ed25519PublicKey):
        raise SigningError(f"{where} is not an Ed25519 key ({type(key).__name__})")
    return key


def generate_keypair(
    directory: str | os.PathLike[str], force: bool = False, stem: str = "vehicle"
) -> tuple[Path, Path, str]:
    """Create `{stem}.key` (PKCS#8 PEM, mode 0600) and `{stem}.pub` in `directory`.

    Returns (private_path, public_path, kid_hex). Creates the directory with mode 0700 if
    missing. Refuses to replace an existing key or public key unless force=True. Each file
    is written atomically (temp file, fsync, rename, fsync of the directory), the private
    key first: a crash in between leaves a key whose public half can be re-derived.
    """
    directory = Path(directory)
    private_path = directory / f"{stem}.key"
    public_path = directory / f"{stem}.pub"
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise SigningError(f"cannot create key directory {directory}: {exc.strerror or exc}") from None
    if not force:
        for existing in (private_path, public_path):
            if existing.exists():
                raise SigningError(
                    f"{existing} already exists; refusing to overwrite it "
                    "(pass --force to replace the key; messages signed with the old one will no longer verify)"
                )
    key = Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    try:
        atomic_write(private_path, private_pem, 0o600)
        atomic_write(public_path, public_pem, 0o644)
    except OSError as exc:
        raise SigningError(f"cannot write key files in {directory}: {exc.strerror or exc}") from None
    return private_path, public_path, kid_of(key.public_key()).hex()
