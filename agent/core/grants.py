"""Rental grants: a backend-signed delegation to a driver's key (PROTOCOL.md §11). Sans-I/O.

A grant is a COSE_Sign1 (§2) signed by a trust-store key whose `allow` names `rental.grant`:

    { "v": 1, "vin": tstr, "rental": tstr, "key": bstr, "allow": [tstr], "nbf": uint, "exp": uint }

It rides in the protected header of the driver's command under the text label "grant". This
module reads that label, verifies the grant once (GrantCache, by sha256 of its bytes) and
checks it for one command (vin, window, revocation); the gate (core/commands.py) then verifies
the command's own signature with the grant's key and runs the rest of §6.

Choices where the protocol is silent (README "Protocol decisions"):
- a grant is at most MAX_GRANT_BYTES (4 KiB) and its payload has exactly the seven fields;
- its window `exp - nbf` is at most `max_grant_ms` (config [rental], 7 days by default): a
  revocation is kept for that long, so it outlives every grant of that rental;
- a malformed grant is BAD_ENVELOPE; an unknown signer or one not allowed `rental.grant` is
  UNKNOWN_KEY; a grant for another vehicle WRONG_VEHICLE; outside nbf..exp EXPIRED; a revoked
  or ended rental UNAUTHORIZED; a command kid that is not the grant's key BAD_SIGNATURE.
"""

from __future__ import annotations

import fnmatch
import hashlib
import re
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from agent.errors import VerificationError

from . import cose
from .protocol import BAD_ENVELOPE, BAD_SIGNATURE, EXPIRED, UNAUTHORIZED, UNKNOWN_KEY, WRONG_VEHICLE

GRANT_LABEL = "grant"
GRANT_PERMISSION = "rental.grant"  # what a trust-store key's allow must name to sign grants
MAX_GRANT_BYTES = 4096
MAX_GRANT_MS = 7 * 24 * 3600 * 1000
CACHE_SIZE = 64
_FIELDS = ("v", "vin", "rental", "key", "allow", "nbf", "exp")
_RENTAL = re.compile(r"[A-Za-z0-9._:-]{1,64}", re.ASCII)


class GrantError(Exception):
    """A grant refused: `reason` is the §7 reason, `detail` what a car-sharing app can show."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason, self.detail = reason, detail


@dataclass(frozen=True, slots=True)
class Grant:
    """A grant whose signature checked out against the trust store."""

    rental: str
    vin: str
    key: cose.PublicKey  # the driver's key
    kid: bytes  # kid_of(key): the command's kid must be this
    allow: tuple[str, ...]
    nbf: int
    exp: int
    signer_kid: bytes
    signer_name: str
    digest: bytes  # sha256 of the grant bytes

    def allows(self, name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, p) for p in self.allow)


def grant_bytes(message: Any) -> bytes | None:
    """The grant a command carries in its protected header, or None. Raises GrantError
    (BAD_ENVELOPE) for a label that is not a bstr; VerificationError for a bad envelope."""
    env = cose._parse(message, cose.MAX_PAYLOAD + cose._ENVELOPE_SLACK)
    header = cose._decode_one(env.protected, "protected header")
    if GRANT_LABEL not in header:
        return None
    value = header[GRANT_LABEL]
    if type(value) is not bytes:
        raise GrantError(BAD_ENVELOPE, "grant: must be a bstr holding a COSE_Sign1")
    return value


def claimed_signer(protected: bytes) -> bytes | None:
    """For the flood screen, without any signature check: the kid the grant in this protected
    header claims to be signed by, or None when there is no grant. Raises GrantError
    (BAD_ENVELOPE) for a grant that cannot be one, VerificationError for a bad header."""
    header = cose._decode_one(protected, "protected header")
    if not isinstance(header, Mapping) or GRANT_LABEL not in header:
        return None
    grant = header[GRANT_LABEL]
    if type(grant) is not bytes:
        raise GrantError(BAD_ENVELOPE, "grant: must be a bstr holding a COSE_Sign1")
    if len(grant) > MAX_GRANT_BYTES:
        raise GrantError(BAD_ENVELOPE, f"grant is {len(grant)} bytes, over the "
                                       f"{MAX_GRANT_BYTES}-byte limit")
    kid = signer_kid(grant)
    if kid is None:
        raise GrantError(BAD_ENVELOPE, "grant: not a valid COSE_Sign1")
    return kid


def signer_kid(grant: bytes) -> bytes | None:
    """The kid the grant claims to be signed by (unverified; for flood budgets), or None."""
    try:
        return cose._parse(grant, MAX_GRANT_BYTES).kid
    except VerificationError:
        return None


def public_key_of(raw: Any) -> cose.PublicKey:
    """32 bytes: Ed25519; 65 bytes 0x04||x||y: P-256. Raises GrantError(BAD_ENVELOPE)."""
    if type(raw) is bytes and len(raw) == 32:
        return Ed25519PublicKey.from_public_bytes(raw)
    if type(raw) is bytes and len(raw) == 65 and raw[0] == 4:
        try:
            return ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), raw)
        except ValueError:
            raise GrantError(BAD_ENVELOPE, "grant key: not a point on P-256") from None
    raise GrantError(BAD_ENVELOPE, "grant key: must be 32 bytes (Ed25519) or 65 bytes "
                                   "(uncompressed P-256 point)")


def verify_grant(data: bytes, trust: Any, max_grant_ms: int = MAX_GRANT_MS) -> Grant:
    """Signature, signer and schema of one grant (not vin, time or revocation: see check).
    `trust` is a commands.TrustStore. Raises GrantError."""
    if len(data) > MAX_GRANT_BYTES:
        raise GrantError(BAD_ENVELOPE, f"grant is {len(data)} bytes, over the "
                                       f"{MAX_GRANT_BYTES}-byte limit")
    try:
        verified = cose.verify(data, trust.public_keys, max_payload=MAX_GRANT_BYTES)
    except VerificationError as e:
        if e.reason == UNKNOWN_KEY:
            raise GrantError(UNKNOWN_KEY, unknown_signer(signer_kid(data))) from None
        raise GrantError(e.reason, f"grant: {e}") from None
    signer = trust.get(verified.kid)
    if not signer.allows(GRANT_PERMISSION):
        raise GrantError(UNKNOWN_KEY, f"key {signer.name!r} may not issue rental grants")
    p = verified.payload
    for name in _FIELDS:
        if name not in p:
            raise GrantError(BAD_ENVELOPE, f"grant {name}: missing")
    extra = sorted(set(p) - set(_FIELDS))
    if extra:
        raise GrantError(BAD_ENVELOPE, f"grant {extra[0][:32]}: unknown field")
    if type(p["v"]) is not int or p["v"] != 1:
        raise GrantError(BAD_ENVELOPE, "grant v: must be 1")
    if type(p["vin"]) is not str:
        raise GrantError(BAD_ENVELOPE, "grant vin: must be a text string")
    if type(p["rental"]) is not str or not _RENTAL.fullmatch(p["rental"]):
        raise GrantError(BAD_ENVELOPE, "grant rental: must be 1-64 characters of "
                                       "A-Z a-z 0-9 . _ : -")
    allow = p["allow"]
    if type(allow) not in (list, tuple) or not allow or not all(type(a) is str and a
                                                                 for a in allow):
        raise GrantError(BAD_ENVELOPE, "grant allow: must be a non-empty array of patterns")
    for name in ("nbf", "exp"):
        if type(p[name]) is not int or p[name] < 0:
            raise GrantError(BAD_ENVELOPE, f"grant {name}: must be an unsigned integer (ms)")
    if p["exp"] <= p["nbf"]:
        raise GrantError(BAD_ENVELOPE, "grant exp: must be later than nbf")
    if p["exp"] - p["nbf"] > max_grant_ms:
        raise GrantError(EXPIRED, f"grant valid for {(p['exp'] - p['nbf']) // 3_600_000} h, "
                                  f"at most {max_grant_ms // 3_600_000} h accepted")
    key = public_key_of(p["key"])
    return Grant(rental=p["rental"], vin=p["vin"], key=key, kid=cose.kid_of(key),
                 allow=tuple(allow), nbf=p["nbf"], exp=p["exp"], signer_kid=verified.kid,
                 signer_name=signer.name, digest=hashlib.sha256(data).digest())


def unknown_signer(kid: bytes | None) -> str:
    return ("grant signed by a key this vehicle does not trust "
            f"(kid={kid.hex() if kid is not None else '?'})")


class GrantCache:
    """Verified grants by sha256 of their bytes, the newest `size` kept: a phone's commands
    then cost one signature check each. A hit is re-checked against the current trust store
    (the signer may have been removed on a reload)."""

    def __init__(self, size: int = CACHE_SIZE, max_grant_ms: int = MAX_GRANT_MS):
        self.size = size
        self.max_grant_ms = max_grant_ms
        self._cache: OrderedDict[bytes, Grant] = OrderedDict()
        self.verified = 0  # grant signature checks done (for tests and status)

    def get(self, data: bytes, trust: Any) -> Grant:
        digest = hashlib.sha256(data).digest()
        grant = self._cache.get(digest)
        if grant is not None:
            signer = trust.get(grant.signer_kid)
            if signer is not None and signer.allows(GRANT_PERMISSION):
                self._cache.move_to_end(digest)
                return grant
            del self._cache[digest]  # trust changed: verify again (and refuse)
        self.verified += 1
        grant = verify_grant(data, trust, self.max_grant_ms)
        self._cache[digest] = grant
        if len(self._cache) > self.size:
            self._cache.popitem(last=False)
        return grant


    def latest_exp(self, rental: str) -> int | None:
        """The latest exp of a cached grant of `rental` (how long to keep its revocation)."""
        return max((g.exp for g in self._cache.values() if g.rental == rental), default=None)


Revoked = Callable[[str, int], bool]  # (rental, grant nbf) -> refused (core/rental.py)?


def check(grant: Grant, vin: str, now_ms: int, revoked: Revoked | None) -> None:
    """The per-command checks of a verified grant, in §11's order. Raises GrantError."""
    if grant.vin != vin:
        raise GrantError(WRONG_VEHICLE, f"this rental key is for vehicle {grant.vin[:32]!r}, "
                                        "not this one")
    if now_ms < grant.nbf:
        raise GrantError(EXPIRED, f"rental {grant.rental} starts in "
                                  f"{_minutes(grant.nbf - now_ms)}")
    if now_ms > grant.exp:
        raise GrantError(EXPIRED, f"rental {grant.rental} ended {_minutes(now_ms - grant.exp)} ago")
    if revoked is not None and revoked(grant.rental, grant.nbf):
        raise GrantError(UNAUTHORIZED, f"rental {grant.rental} has ended or was revoked")


def check_kid(grant: Grant, kid: bytes) -> None:
    if kid != grant.kid:
        raise GrantError(BAD_SIGNATURE, f"command signed by kid={kid.hex()}, not by the rental "
                                        f"key kid={grant.kid.hex()}")


def _minutes(ms: int) -> str:
    if ms < 120_000:
        return f"{ms // 1000} s"
    return f"{ms // 60_000} min"
