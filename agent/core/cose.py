"""COSE_Sign1 with Ed25519 or ECDSA P-256: the envelope of every message (PROTOCOL.md §2).

    18([ bstr .cbor {1: alg, 3: content_type, 4: kid}, {}, payload: bstr, signature: bstr ])

alg is -8 (EdDSA, Ed25519) or -7 (ES256: ECDSA P-256 with SHA-256, the signature the 64-byte
r||s of RFC 9053 §2.1). The signature covers the standard Sig_structure
["Signature1", protected, h'', payload].
Payloads are CBOR maps with text keys, optionally wrapped in a zlib stream (RFC 1950).

Pure code: no file or network I/O. Key files live in agent.adapters.keys.

Receiver-side choices where PROTOCOL.md is silent (strict, so that two parsers can never
disagree about what was signed):
- trailing bytes after the COSE structure, the protected header or the zlib stream are rejected;
- duplicate map keys are rejected (protected header and payload);
- alg/kid/content type must be protected; the same labels in the unprotected map are rejected,
  other unprotected labels are ignored; a `crit` (label 2) header is rejected in either map
  (RFC 9052 §3.1 only allows it protected, and we understand no critical extension);
- the alg must be the one of the key `kid` names (-8 for Ed25519, -7 for P-256); any other
  pairing is BAD_SIGNATURE (alg confusion), an alg that is neither is BAD_ENVELOPE;
- no CBOR item anywhere (envelope, protected header, payload) may carry a tag that a decoder
  would turn into plain data: bignums (tags 2/3: an `iat` of 2(h'01') is not the integer 1
  here), string references (25/256), shared values (28/29), the self-describe prefix 55799
  (the message is exactly 18([...]); two parsers must not disagree on where it starts);
- the payload is plain data: maps, arrays, text, bytes, int (within the 64-bit range of CBOR
  major types 0/1), float, bool, null. Whatever decodes to anything else (datetimes, decimals,
  undefined, other simple values, ...) is rejected.
- ES256 signatures are accepted with either s or n-s (RFC 9053 does not require low-S and
  third-party signers do not normalise); nothing here keys on the signature bytes: a
  re-delivery is told by the payload bytes.
"""

from __future__ import annotations

import hashlib
import io
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import cbor2
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)
from cryptography.hazmat.primitives.hashes import SHA256
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from agent.errors import VerificationError

__all__ = [
    "ALG_EDDSA",
    "ALG_ES256",
    "PublicKey",
    "SigningKey",
    "alg_of",
    "software_key",
    "CT_CBOR",
    "CT_CBOR_ZLIB",
    "MAX_PAYLOAD",
    "Signer",
    "Verified",
    "decode_unverified",
    "kid_of",
    "verify",
]

COSE_SIGN1_TAG = 18
ALG_EDDSA = -8
ALG_ES256 = -7
ALGS = (ALG_EDDSA, ALG_ES256)
ALG_NAMES = {ALG_EDDSA: "EdDSA", ALG_ES256: "ES256"}
PublicKey = Ed25519PublicKey | ec.EllipticCurvePublicKey  # P-256 only, see alg_of
CT_CBOR = "application/cbor"
CT_CBOR_ZLIB = "application/cbor+zlib"
CONTENT_TYPES = (CT_CBOR, CT_CBOR_ZLIB)
MAX_PAYLOAD = 256 * 1024  # bytes after decompression (PROTOCOL.md §2)

_H_ALG, _H_CRIT, _H_CT, _H_KID = 1, 2, 3, 4
# Room for the protected header, the signature and deflate's worst-case expansion of
# incompressible data (~5 bytes per 64 KiB); anything larger is refused before parsing.
_ENVELOPE_SLACK = 4096
_SIG_CONTEXT = b"\x6aSignature1"  # CBOR tstr "Signature1"
_SCALARS = frozenset({str, bytes, float, bool, type(None)})  # plus int, range-checked
_INT_MIN, _INT_MAX = -(1 << 64), (1 << 64) - 1  # what CBOR encodes without a bignum tag
# Every tag cbor2 would decode into something else (see the module docstring): refused while
# decoding. Tags it leaves alone come out as CBORTag, which _is_plain refuses in a payload.
_DECODED_TAGS = (0, 1, 2, 3, 4, 5, 25, 28, 29, 30, 35, 36, 37, 52, 54, 100, 256, 258, 260, 261,
                 1004, 43000, 55799)
_P256_ORDER_BYTES = 32


class _TagRefused(ValueError):
    pass


def _refuse_tag(tag: int):
    def refuse(*_args):
        raise _TagRefused(f"CBOR tag {tag} is not allowed")
    return refuse


_NO_TAG_DECODERS = {tag: _refuse_tag(tag) for tag in _DECODED_TAGS}


def _head(major: int, n: int) -> bytes:
    """CBOR initial byte(s) for major type `major` and length/value `n` (shortest form)."""
    mt = major << 5
    if n < 24:
        return bytes((mt | n,))
    if n < 0x100:
        return bytes((mt | 24, n))
    if n < 0x10000:
        return bytes((mt | 25,)) + n.to_bytes(2, "big")
    if n < 0x100000000:
        return bytes((mt | 26,)) + n.to_bytes(4, "big")
    return bytes((mt | 27,)) + n.to_bytes(8, "big")


def _bstr(data: bytes) -> bytes:
    return _head(2, len(data)) + data


def _sig_structure(protected: bytes, payload: bytes) -> bytes:
    # Hand-built (array of 4, fixed context, empty external AAD) so that signing does not
    # re-encode anything; tests check it byte for byte against cbor2 and pycose.
    return b"\x84" + _SIG_CONTEXT + _bstr(protected) + b"\x40" + _bstr(payload)


def alg_of(public_key: Any) -> int:
    """The COSE alg for a public key: -8 for Ed25519, -7 for P-256; TypeError for others."""
    if isinstance(public_key, Ed25519PublicKey):
        return ALG_EDDSA
    if isinstance(public_key, ec.EllipticCurvePublicKey) and isinstance(public_key.curve, ec.SECP256R1):
        return ALG_ES256
    raise TypeError(f"unsupported key type {type(public_key).__name__} "
                    f"(Ed25519 or ECDSA P-256 only)")


def public_bytes(public_key: PublicKey) -> bytes:
    """32-byte raw Ed25519 key, or the 65-byte uncompressed P-256 point 0x04||x||y."""
    if alg_of(public_key) == ALG_EDDSA:
        return public_key.public_bytes(Encoding.Raw, PublicFormat.Raw)
    return public_key.public_bytes(Encoding.X962, PublicFormat.UncompressedPoint)


def kid_of(public_key: PublicKey) -> bytes:
    """Key id: the first 8 bytes of SHA-256 of public_bytes(public_key) (PROTOCOL.md §2)."""
    return hashlib.sha256(public_bytes(public_key)).digest()[:8]


def es256_raw(der_signature: bytes) -> bytes:
    """A DER ECDSA P-256 signature as COSE wants it: r||s, 32 bytes each."""
    r, s = decode_dss_signature(der_signature)
    return r.to_bytes(_P256_ORDER_BYTES, "big") + s.to_bytes(_P256_ORDER_BYTES, "big")


class SigningKey:
    """What Signer signs with: `alg`, `public_key` and sign(data) -> the COSE signature.

    sign() gets the whole Sig_structure (it hashes for ES256 itself). Subclass or duck-type it
    for keys held elsewhere (agent.adapters.pkcs11); software_key() wraps an in-memory key.
    """

    alg: int
    public_key: PublicKey

    def sign(self, data: bytes) -> bytes:  # pragma: no cover - interface
        raise NotImplementedError


class _Ed25519Key(SigningKey):
    def __init__(self, key: Ed25519PrivateKey):
        self._key, self.alg, self.public_key = key, ALG_EDDSA, key.public_key()

    def sign(self, data: bytes) -> bytes:
        return self._key.sign(data)


class _P256Key(SigningKey):
    def __init__(self, key: ec.EllipticCurvePrivateKey):
        self._key, self.alg, self.public_key = key, ALG_ES256, key.public_key()

    def sign(self, data: bytes) -> bytes:
        return es256_raw(self._key.sign(data, ec.ECDSA(SHA256())))


def software_key(private_key: Any) -> SigningKey:
    """Wrap an Ed25519 or P-256 private key from `cryptography`; TypeError for anything else."""
    if isinstance(private_key, Ed25519PrivateKey):
        return _Ed25519Key(private_key)
    if (isinstance(private_key, ec.EllipticCurvePrivateKey)
            and isinstance(private_key.curve, ec.SECP256R1)):
        return _P256Key(private_key)
    raise TypeError(f"Signer needs an Ed25519 or P-256 private key or a SigningKey, "
                    f"not {type(private_key).__name__}")


def _is_plain(value: Any) -> bool:
    """True if a decoded payload holds only plain data (no tags, no sharing, no cycles).

    Iterative, so deep nesting cannot hit the recursion limit. A container seen twice
    means a shared reference (CBOR tags 28/29), refused because it can build cycles or
    exponential fan-out for whoever walks the payload next.
    """
    seen: set[int] = set()
    stack = [value]
    while stack:
        item = stack.pop()
        kind = type(item)
        if kind in _SCALARS:
            continue
        if kind is int:
            if not _INT_MIN <= item <= _INT_MAX:
                return False
            continue
        if kind is not dict and kind is not list:
            return False
        if id(item) in seen:
            return False
        seen.add(id(item))
        if kind is dict:
            for key in item:
                if type(key) not in _SCALARS and type(key) is not int:
                    return False
            stack.extend(item.values())
        else:
            stack.extend(item)
    return True


def _check_payload_type(payload: Any) -> bool:
    return type(payload) is dict and all(type(k) is str for k in payload)


@dataclass(frozen=True, slots=True)
class _Prepared:
    """Per-content-type byte strings that never change for one key."""

    content_type: str
    sig_prefix: bytes  # Sig_structure up to (excluding) the payload bstr
    msg_prefix: bytes  # tag, array head, protected bstr, empty unprotected map


class Signer:
    """Signs payload dicts as tagged COSE_Sign1 messages with one key.

    `key` is an Ed25519 or P-256 private key from `cryptography`, or a SigningKey (a key in a
    token: only sign(bytes) -> bytes crosses into it).
    """

    def __init__(self, key: Any):
        if not isinstance(key, SigningKey):
            key = software_key(key)
        self._key = key
        self.alg: int = key.alg
        self.public_key: PublicKey = key.public_key
        if alg_of(self.public_key) != self.alg:
            raise TypeError(f"alg {self.alg} does not match the {type(self.public_key).__name__}")
        self.kid: bytes = kid_of(self.public_key)
        # Encode the protected header once per content type: signing a message then only
        # costs the payload encoding, (maybe) zlib, and the signature.
        self._prepared = {}
        for ct in CONTENT_TYPES:
            protected = cbor2.dumps({_H_ALG: self.alg, _H_KID: self.kid, _H_CT: ct}, canonical=True)
            self._prepared[ct] = _Prepared(
                content_type=ct,
                sig_prefix=b"\x84" + _SIG_CONTEXT + _bstr(protected) + b"\x40",
                msg_prefix=bytes((0xC0 | COSE_SIGN1_TAG, 0x84)) + _bstr(protected) + b"\xa0",
            )

    def sign(self, payload: dict, compress: bool | None = None) -> bytes:
        """Return the encoded COSE_Sign1 message for `payload`.

        The payload is encoded as canonical CBOR (sorted keys, shortest integers and floats).
        compress=None uses application/cbor+zlib only when the whole message gets smaller;
        True/False force the choice. Values must be plain data (dict, list, str, bytes, int,
        float, bool, None): anything cbor2 encodes as a tag (datetime, set, ...) is rejected
        by receivers. Raises TypeError for a payload that is not a dict with text keys or
        holds a value cbor2 cannot encode, ValueError when the encoded payload exceeds
        MAX_PAYLOAD.
        """
        if not _check_payload_type(payload):
            raise TypeError("payload must be a dict with str keys")
        # Values are not walked here (it would cost ~20% of sign()): producers must stick
        # to plain data, which receivers enforce; types cbor2 cannot encode raise TypeError.
        raw = cbor2.dumps(payload, canonical=True)
        if len(raw) > MAX_PAYLOAD:
            raise ValueError(f"payload is {len(raw)} bytes, over the {MAX_PAYLOAD}-byte limit")

        plain = self._prepared[CT_CBOR]
        if compress is False:
            prep, body = plain, raw
        else:
            packed = _deflate(raw)
            prep, body = self._prepared[CT_CBOR_ZLIB], packed
            if compress is None and _size(plain, raw) <= _size(prep, packed):
                prep, body = plain, raw
        head = _head(2, len(body))
        signature = self._key.sign(prep.sig_prefix + head + body)
        if type(signature) is not bytes or len(signature) != 64:  # Ed25519 and r||s alike
            raise ValueError(f"the signing key returned {len(signature)} bytes, not 64")
        return prep.msg_prefix + head + body + b"\x58\x40" + signature


def _deflate(raw: bytes) -> bytes:
    # A window just big enough for the data (deflate keeps 262 bytes of lookahead) gives the
    # same output as the default 32 KiB one but allocates far less state: ~3x faster on small
    # command statuses. Any RFC 1950 decoder accepts the smaller window.
    wbits = min(15, max(9, (len(raw) + 262).bit_length()))
    return zlib.compress(raw, 6, wbits)


def _size(prep: _Prepared, body: bytes) -> int:
    return len(prep.msg_prefix) + len(_head(2, len(body))) + len(body)


@dataclass(frozen=True, slots=True)
class Verified:
    """A message that passed verify().

    payload_bytes is the CBOR encoding of the payload exactly as signed (after
    decompression): compare it to tell a re-delivery from a replay with different content.
    """

    kid: bytes
    content_type: str
    payload: dict
    payload_bytes: bytes
    alg: int = ALG_EDDSA


@dataclass(frozen=True, slots=True)
class _Envelope:
    protected: bytes
    alg: int
    kid: bytes
    content_type: str
    payload: bytes  # as carried, possibly zlib-compressed
    signature: bytes


def _bad(message: str) -> VerificationError:
    return VerificationError("BAD_ENVELOPE", message)


def _decode_one(data: bytes, what: str) -> Any:
    """Decode exactly one CBOR item filling all of `data`; any failure is BAD_ENVELOPE."""
    stream = io.BytesIO(data)
    try:
        value = cbor2.CBORDecoder(stream, allow_duplicate_keys=False,
                                  semantic_decoders=_NO_TAG_DECODERS).decode()
    # cbor2 raises CBORDecodeError but also ValueError/TypeError/OverflowError/... from
    # semantic tag decoders; every one of them just means "not acceptable CBOR".
    except Exception as exc:  # noqa: BLE001
        cause = exc.__cause__ if isinstance(exc.__cause__, _TagRefused) else exc
        raise _bad(f"{what} is not valid CBOR: {cause}") from None
    if stream.tell() != len(data):
        raise _bad(f"{what} has {len(data) - stream.tell()} trailing bytes")
    return value


def _parse(message: Any, max_message: int) -> _Envelope:
    """Structural checks on the envelope, before any key or signature is looked at."""
    if not isinstance(message, (bytes, bytearray, memoryview)):
        raise _bad(f"message must be bytes, not {type(message).__name__}")
    message = bytes(message)
    if len(message) > max_message:
        raise _bad(f"message is {len(message)} bytes, over the {max_message}-byte bound")
    obj = _decode_one(message, "message")
    if type(obj) is not cbor2.CBORTag or obj.tag != COSE_SIGN1_TAG:
        raise _bad("not a tagged COSE_Sign1 (CBOR tag 18)")
    # cbor2 6 decodes tag contents immutably (tuple/frozendict); accept both forms.
    items = obj.value
    if type(items) not in (list, tuple) or len(items) != 4:
        raise _bad("COSE_Sign1 must be an array of 4 items")
    protected, unprotected, payload, signature = items
    if not (
        type(protected) is bytes
        and isinstance(unprotected, Mapping)
        and type(payload) is bytes
        and type(signature) is bytes
    ):
        raise _bad("COSE_Sign1 items must be bstr, map, bstr (attached payload), bstr")
    header = _decode_one(protected, "protected header")
    if not isinstance(header, Mapping):
        raise _bad("protected header is not a CBOR map")
    alg = header.get(_H_ALG)
    if type(alg) is not int or alg not in ALGS:
        raise _bad(f"alg must be {ALG_EDDSA} (EdDSA) or {ALG_ES256} (ES256), got {alg!r}")
    if _H_CRIT in header or _H_CRIT in unprotected:
        raise _bad("critical header parameters (label 2) are not supported")
    content_type = header.get(_H_CT)
    if type(content_type) is not str or content_type not in CONTENT_TYPES:
        raise _bad(f"unsupported content type {content_type!r}")
    kid = header.get(_H_KID)
    if type(kid) is not bytes:
        raise _bad("kid (label 4) missing from the protected header or not a bstr")
    for label in (_H_ALG, _H_CT, _H_KID):
        if label in unprotected:
            raise _bad(f"header label {label} must only be in the protected header")
    return _Envelope(protected, alg, kid, content_type, payload, signature)


def _inflate(data: bytes, limit: int) -> bytes:
    """Decompress a zlib stream, never producing more than limit+1 bytes (bomb-proof)."""
    inflater = zlib.decompressobj(wbits=15)  # zlib format only (RFC 1950), no gzip/raw
    try:
        out = inflater.decompress(data, limit + 1)
    except zlib.error as exc:
        raise _bad(f"payload is not a valid zlib stream: {exc}") from None
    if len(out) > limit:
        raise _bad(f"payload is over {limit} bytes after decompression")
    if not inflater.eof:
        raise _bad("payload zlib stream is truncated")
    if inflater.unused_data:
        raise _bad("payload has trailing bytes after the zlib stream")
    return out


def _open_payload(env: _Envelope, max_payload: int) -> tuple[dict, bytes]:
    if env.content_type == CT_CBOR_ZLIB:
        data = _inflate(env.payload, max_payload)
    else:
        data = env.payload
        if len(data) > max_payload:
            raise _bad(f"payload is {len(data)} bytes, over the {max_payload}-byte limit")
    payload = _decode_one(data, "payload")
    if not _check_payload_type(payload):
        raise _bad("payload is not a CBOR map with text keys")
    if not _is_plain(payload):
        raise _bad("payload holds CBOR tags, shared references or special values")
    return payload, data


def _signature_ok(key: PublicKey, signature: bytes, data: bytes) -> bool:
    try:
        if isinstance(key, Ed25519PublicKey):
            key.verify(signature, data)
            return True
        if len(signature) != 2 * _P256_ORDER_BYTES:
            return False
        r = int.from_bytes(signature[:_P256_ORDER_BYTES], "big")
        s = int.from_bytes(signature[_P256_ORDER_BYTES:], "big")
        key.verify(encode_dss_signature(r, s), data, ec.ECDSA(SHA256()))
        return True
    except (InvalidSignature, ValueError):
        return False


def verify(
    message: bytes,
    keys: Mapping[bytes, PublicKey],
    max_payload: int = MAX_PAYLOAD,
) -> Verified:
    """Verify a COSE_Sign1 message against trusted keys (kid -> Ed25519 or P-256 public key).

    Raises VerificationError with reason BAD_ENVELOPE (malformed envelope, unsupported alg,
    unsupported content type, oversized, payload not a CBOR map with text keys),
    UNKNOWN_KEY (kid not in `keys`) or BAD_SIGNATURE (including an alg that is not the one
    of the key's type). The payload is only decompressed and decoded after the signature
    checks out. Any input yields a Verified or a VerificationError, never another exception.
    """
    env = _parse(message, max_payload + _ENVELOPE_SLACK)
    key = keys.get(env.kid)
    if key is None:
        raise VerificationError("UNKNOWN_KEY", f"unknown signing key kid={env.kid.hex()}")
    try:
        key_alg = alg_of(key)
    except TypeError:
        raise VerificationError("BAD_SIGNATURE", f"kid={env.kid.hex()} names an unsupported key") from None
    if env.alg != key_alg:
        raise VerificationError("BAD_SIGNATURE", f"alg {env.alg} ({ALG_NAMES[env.alg]}) does not "
                                f"match kid={env.kid.hex()}, a {ALG_NAMES[key_alg]} key")
    if not _signature_ok(key, env.signature, _sig_structure(env.protected, env.payload)):
        raise VerificationError("BAD_SIGNATURE", f"signature does not verify for kid={env.kid.hex()}")
    payload, payload_bytes = _open_payload(env, max_payload)
    return Verified(env.kid, env.content_type, payload, payload_bytes, env.alg)


def decode_unverified(message: bytes, max_payload: int = MAX_PAYLOAD) -> tuple[bytes, str, dict]:
    """(kid, content_type, payload) WITHOUT checking the signature: diagnostics only.

    Applies the same envelope and payload checks as verify() (raising VerificationError
    with BAD_ENVELOPE); never trust the result.
    """
    env = _parse(message, max_payload + _ENVELOPE_SLACK)
    payload, _ = _open_payload(env, max_payload)
    return env.kid, env.content_type, payload
