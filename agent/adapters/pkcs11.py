"""The vehicle's signing key inside a PKCS#11 token (secure element, TPM, HSM; SoftHSM2 in tests).

    [signing]
    pkcs11 = { module = "/usr/lib/softhsm/libsofthsm2.so", token = "tcu", key_label = "vehicle",
               pin_file = "/etc/tcu-agent/token.pin" }

Only sign(bytes) -> bytes crosses into the token: the private key is created there as
sensitive and not extractable, and never exists in this process or on disk.
- Ed25519: CKM_EDDSA over the whole Sig_structure (the token hashes, as Ed25519 must).
- P-256: CKM_ECDSA over a SHA-256 digest computed here (SoftHSM2 and many secure elements
  have no CKM_ECDSA_SHA256); the token returns r||s, which is COSE's ES256 format already.
The public half is read from the token's public key object with the same label; on open one
test signature is verified with it, so a public/private pair that does not match (two keys
under one label) is refused at start, not discovered by the cloud.

python-pkcs11 sessions are not thread-safe: one lock per key (the will is signed from the
MQTT thread, everything else from the core thread).
"""

from __future__ import annotations

import hashlib
import os
import stat
import threading
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from agent.core.cose import ALG_EDDSA, ALG_ES256, SigningKey, kid_of, verify, Signer
from agent.errors import SigningError

__all__ = ["Pkcs11Key", "generate", "open_key", "read_pin"]

# DER of the curve parameters (CKA_EC_PARAMS): namedCurve OIDs.
P256_PARAMS = bytes.fromhex("06082a8648ce3d030107")  # 1.2.840.10045.3.1.7
ED25519_PARAMS = bytes.fromhex("06032b6570")  # 1.3.101.112 (RFC 8410)
ED25519_NAME = bytes.fromhex("130c") + b"edwards25519"  # PrintableString form, PKCS#11 3.0
_libs: dict[str, Any] = {}  # one loaded module per path: C_Initialize runs once per process
_libs_lock = threading.Lock()


def read_pin(path: Path) -> str:
    """The user PIN from a file (first line), refusing group/other access like a key file."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as e:
        raise SigningError(f"cannot open the token PIN file {path}: {e.strerror or e}") from None
    with os.fdopen(fd, "rb") as f:
        mode = os.fstat(f.fileno()).st_mode
        if mode & 0o077:
            raise SigningError(f"token PIN file {path} is accessible by group or others "
                               f"(mode {stat.S_IMODE(mode):04o}); run `chmod 600 {path}`")
        data = f.read(1024)
    pin = data.decode("utf-8", "replace").splitlines()[0].strip() if data.strip() else ""
    if not pin:
        raise SigningError(f"token PIN file {path} is empty")
    return pin


def _lib(module: Path):
    import pkcs11  # loaded only when a token is configured

    with _libs_lock:
        key = str(module)
        if key not in _libs:
            try:
                _libs[key] = pkcs11.lib(key)
            except Exception as e:  # noqa: BLE001 - a bad path or a broken module
                raise SigningError(f"cannot load the PKCS#11 module {module}: {e}") from None
        return _libs[key]


def _session(module: Path, token_label: str, pin: str, rw: bool = False):
    import pkcs11

    lib = _lib(module)
    try:
        token = lib.get_token(token_label=token_label)
    except pkcs11.NoSuchToken:
        labels = sorted(t.label for t in lib.get_tokens() if t.label)
        raise SigningError(f"no PKCS#11 token labelled {token_label!r} in {module} "
                           f"(tokens: {', '.join(labels) or 'none'})") from None
    except pkcs11.MultipleTokensReturned:
        raise SigningError(f"more than one PKCS#11 token labelled {token_label!r}") from None
    try:
        return token.open(rw=rw, user_pin=pin)
    except pkcs11.UserAlreadyLoggedIn:
        # Login is per process and token, not per session: another session of ours is open.
        return token.open(rw=rw)
    except pkcs11.PinIncorrect:
        raise SigningError(f"wrong PIN for the PKCS#11 token {token_label!r}") from None
    except pkcs11.PKCS11Error as e:
        raise SigningError(f"cannot open a session on token {token_label!r}: "
                           f"{type(e).__name__}") from None


def _octets(value: bytes) -> bytes:
    """CKA_EC_POINT is a DER OCTET STRING (PKCS#11 2.40); some tokens give the raw point."""
    if len(value) >= 2 and value[0] == 0x04 and value[1] == len(value) - 2 and value[1] < 0x80:
        return value[2:]
    if len(value) >= 3 and value[0] == 0x04 and value[1] == 0x81 and value[2] == len(value) - 3:
        return value[3:]
    return value


def _public_key(params: bytes, point: bytes):
    raw = _octets(point)
    if params == P256_PARAMS:
        if len(raw) != 65 or raw[0] != 0x04:
            raise SigningError("the token's P-256 public key is not an uncompressed point")
        return ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), raw)
    if params in (ED25519_PARAMS, ED25519_NAME):
        if len(raw) != 32:
            raise SigningError("the token's Ed25519 public key is not 32 bytes")
        return Ed25519PublicKey.from_public_bytes(raw)
    raise SigningError(f"the token key's curve ({params.hex()}) is neither P-256 nor Ed25519")


class Pkcs11Key(SigningKey):
    """A key in a token, as cose.Signer wants it. Keeps one logged-in session open."""

    def __init__(self, session, private, public_key, label: str):
        import pkcs11

        self._session, self._private, self.public_key, self.label = session, private, public_key, label
        self.alg = ALG_EDDSA if isinstance(public_key, Ed25519PublicKey) else ALG_ES256
        self._mechanism = pkcs11.Mechanism.EDDSA if self.alg == ALG_EDDSA else pkcs11.Mechanism.ECDSA
        self._lock = threading.Lock()

    @property
    def kid(self) -> bytes:
        return kid_of(self.public_key)

    def sign(self, data: bytes) -> bytes:
        if self.alg == ALG_ES256:
            data = hashlib.sha256(data).digest()
        try:
            with self._lock:
                return bytes(self._private.sign(data, mechanism=self._mechanism))
        except Exception as e:  # noqa: BLE001 - a token fault is a signing error, with its name
            raise SigningError(f"the PKCS#11 token failed to sign: {type(e).__name__} {e}") from None

    def close(self) -> None:
        with self._lock:
            self._session.close()


def open_key(module: Path, token_label: str, key_label: str, pin: str) -> Pkcs11Key:
    """Log in and find the key pair labelled key_label; raises SigningError (one line)."""
    import pkcs11
    from pkcs11 import Attribute, ObjectClass

    session = _session(module, token_label, pin)
    try:
        try:
            private = session.get_key(ObjectClass.PRIVATE_KEY, label=key_label)
            public = session.get_key(ObjectClass.PUBLIC_KEY, label=key_label)
        except pkcs11.NoSuchKey:
            raise SigningError(f"no key pair labelled {key_label!r} on token {token_label!r}; "
                               f"create one with `tcu-agent keys generate --pkcs11 ...`") from None
        except pkcs11.MultipleObjectsReturned:
            raise SigningError(f"more than one key labelled {key_label!r} on token "
                               f"{token_label!r}") from None
        key = Pkcs11Key(session, private,
                        _public_key(bytes(public[Attribute.EC_PARAMS]),
                                    bytes(public[Attribute.EC_POINT])), key_label)
        probe = Signer(key).sign({"probe": 1}, compress=False)
        try:
            verify(probe, {key.kid: key.public_key})
        except Exception:  # noqa: BLE001
            raise SigningError(f"the private and public keys labelled {key_label!r} on token "
                               f"{token_label!r} do not match") from None
        return key
    except BaseException:
        session.close()
        raise


def generate(module: Path, token_label: str, key_label: str, pin: str, alg: str = "es256") -> Pkcs11Key:
    """Create a key pair in the token (private: sensitive, never extractable) and open it."""
    import pkcs11
    from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass

    if alg not in ("eddsa", "es256"):
        raise SigningError(f"unknown key algorithm {alg!r} (known: eddsa, es256)")
    with _session(module, token_label, pin, rw=True) as session:
        for cls in (ObjectClass.PRIVATE_KEY, ObjectClass.PUBLIC_KEY):
            if list(session.get_objects({Attribute.CLASS: cls, Attribute.LABEL: key_label})):
                raise SigningError(f"token {token_label!r} already holds a key labelled "
                                   f"{key_label!r}; refusing to add a second one")
        private_template = {Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False,
                            Attribute.PRIVATE: True}
        if alg == "es256":
            params = session.create_domain_parameters(
                KeyType.EC, {Attribute.EC_PARAMS: P256_PARAMS}, local=True)
            mechanism = Mechanism.EC_KEY_PAIR_GEN
        else:
            params = session.create_domain_parameters(
                KeyType.EC_EDWARDS, {Attribute.EC_PARAMS: ED25519_PARAMS}, local=True)
            mechanism = Mechanism.EC_EDWARDS_KEY_PAIR_GEN
        try:
            params.generate_keypair(store=True, label=key_label, mechanism=mechanism,
                                    private_template=private_template)
        except pkcs11.PKCS11Error as e:
            raise SigningError(f"token {token_label!r} cannot create a {alg} key: "
                               f"{type(e).__name__}") from None
    return open_key(module, token_label, key_label, pin)
