"""Key files: load the vehicle's private key, load trusted public keys, generate pairs.

Keys are Ed25519 (COSE EdDSA) or ECDSA P-256 (COSE ES256); any other type is refused.

Private keys are PKCS#8 PEM, unencrypted (the agent starts unattended), and must not be
accessible by group or others. Public keys are SubjectPublicKeyInfo PEM.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.adapters.atomic import atomic_write
from agent.core.cose import PublicKey, alg_of, kid_of
from agent.errors import SigningError

__all__ = ["ALGS", "generate_keypair", "load_private_key", "load_public_key", "new_private_key"]

_PEM_START = "-----BEGIN"
ALGS = ("eddsa", "es256")  # `keys generate --alg`
PrivateKey = Ed25519PrivateKey | ec.EllipticCurvePrivateKey


def _supported(public_key) -> bool:
    try:
        alg_of(public_key)
        return True
    except TypeError:
        return False


def _kind(key) -> str:
    curve = getattr(key, "curve", None)
    return f"{type(key).__name__}{f' {curve.name}' if curve else ''}"


def load_private_key(path: str | os.PathLike[str]) -> PrivateKey:
    """Load an unencrypted PKCS#8 PEM Ed25519 or P-256 private key, refusing group/other access."""
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
    if not hasattr(key, "public_key") or not _supported(key.public_key()):
        raise SigningError(f"private key {path} is not an Ed25519 or P-256 key ({_kind(key)})")
    return key


def load_public_key(path_or_pem: str | os.PathLike[str]) -> PublicKey:
    """Load an Ed25519 or P-256 public key from a SubjectPublicKeyInfo PEM file or inline PEM.

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
    if not _supported(key):
        raise SigningError(f"{where} is not an Ed25519 or P-256 key ({_kind(key)})")
    return key


def new_private_key(alg: str = "eddsa") -> PrivateKey:
    if alg == "eddsa":
        return Ed25519PrivateKey.generate()
    if alg == "es256":
        return ec.generate_private_key(ec.SECP256R1())
    raise SigningError(f"unknown key algorithm {alg!r} (known: {', '.join(ALGS)})")


def public_pem(public_key: PublicKey) -> bytes:
    return public_key.public_bytes(serialization.Encoding.PEM,
                                   serialization.PublicFormat.SubjectPublicKeyInfo)


def generate_keypair(
    directory: str | os.PathLike[str], force: bool = False, stem: str = "vehicle",
    alg: str = "eddsa",
) -> tuple[Path, Path, str]:
    """Create `{stem}.key` (PKCS#8 PEM, mode 0600) and `{stem}.pub` in `directory`.

    alg: "eddsa" (Ed25519) or "es256" (ECDSA P-256).

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
    key = new_private_key(alg)
    private_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    try:
        atomic_write(private_path, private_pem, 0o600)
        atomic_write(public_path, public_pem(key.public_key()), 0o644)
    except OSError as exc:
        raise SigningError(f"cannot write key files in {directory}: {exc.strerror or exc}") from None
    return private_path, public_path, kid_of(key.public_key()).hex()


def load_signing_key(signing):
    """The vehicle's key from a [signing] section: a key file or a PKCS#11 token key."""
    if signing.pkcs11 is not None:
        from .pkcs11 import open_key, read_pin

        p = signing.pkcs11
        return open_key(p.module, p.token, p.key_label, read_pin(p.pin_file))
    return load_private_key(signing.key_file)


# -- rotation -----------------------------------------------------------------------------------

def next_key_paths(key_file: Path) -> tuple[Path, Path]:
    """Where `keys rotate` puts the next key pair: {stem}.next.key / {stem}.next.pub."""
    key_file = Path(key_file)
    return (key_file.with_name(f"{key_file.stem}.next.key"),
            key_file.with_name(f"{key_file.stem}.next.pub"))


def prepare_rotation(key_file: Path, alg: str | None = None, force: bool = False) -> str:
    """Generate the next key pair beside `key_file` (same algorithm unless `alg`); the agent
    switches to it at its next start. Returns the new kid (hex)."""
    key_file = Path(key_file)
    current = load_private_key(key_file)
    if alg is None:
        alg = "eddsa" if isinstance(current, Ed25519PrivateKey) else "es256"
    next_key, _ = next_key_paths(key_file)
    _, _, kid = generate_keypair(key_file.parent, force=force, stem=next_key.stem, alg=alg)
    return kid


def commit_rotation(key_file: Path) -> None:
    """Move the next key pair over the current one (rename, then fsync of the directory)."""
    from .atomic import fsync_dir

    key_file = Path(key_file)
    next_key, next_pub = next_key_paths(key_file)
    try:
        os.replace(next_key, key_file)
        if next_pub.exists():
            os.replace(next_pub, key_file.with_suffix(".pub"))
        fsync_dir(key_file.parent)
    except OSError as exc:
        raise SigningError(f"cannot switch to the rotated key {next_key}: {exc.strerror or exc}") from None
