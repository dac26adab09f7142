"""Following a vehicle's key rotation from its status records (the cloud's side).

A status record signed by a key the cloud does not know yet may carry
`"key": {"kid", "prev", "proof"}`: the proof is a COSE_Sign1 by the previous key of
{"v": 1, "vin", "t", "kid", "prev", "public_key": SubjectPublicKeyInfo DER}. If `prev` is a
key we trust for this vehicle and the proof verifies, the new key is trusted too.
"""

from __future__ import annotations

from collections.abc import Mapping

from cryptography.hazmat.primitives.serialization import load_der_public_key

from ..core.cose import PublicKey, decode_unverified, kid_of, verify
from ..errors import VerificationError


def follow_rotation(message: bytes, keys: Mapping[bytes, PublicKey], vin: str
                    ) -> tuple[bytes, PublicKey] | None:
    """(kid, public key) of the vehicle's new key if `message` is a status record signed by it
    and its proof is signed by a key in `keys`; None otherwise. The message itself is verified
    with the new key before anything is returned."""
    try:
        kid, _, body = decode_unverified(message)
        if kid in keys:
            return None
        key = body.get("key")
        if not isinstance(key, dict) or type(key.get("proof")) is not bytes:
            return None
        claim = verify(key["proof"], keys).payload
        if claim.get("vin") != vin or claim.get("kid") != kid or claim.get("prev") != key.get("prev"):
            return None
        public = load_der_public_key(claim["public_key"])
        if kid_of(public) != kid:
            return None
        verify(message, {kid: public})
        return kid, public
    except (VerificationError, ValueError, TypeError, KeyError):
        return None
