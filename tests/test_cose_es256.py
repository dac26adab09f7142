"""ES256 (ECDSA P-256, COSE alg -7) beside EdDSA (PROTOCOL.md §2).

Third-party checks use pycose both ways: it verifies what our Signer produces, and commands it
signs pass our command gate. Hostile messages are built with cbor2 + cryptography directly.
"""

from __future__ import annotations

import hashlib

import cbor2
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.hazmat.primitives.hashes import SHA256
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from pycose.algorithms import EdDSA, Es256
from pycose.headers import KID, Algorithm, ContentType
from pycose.keys import EC2Key, OKPKey
from pycose.keys.curves import P256, Ed25519
from pycose.messages import Sign1Message

from agent.core import updates
from agent.core.commands import Accepted, CommandGate, GateLimits, Rejected, TrustedKey, TrustStore
from agent.core.cose import (
    ALG_ES256,
    CT_CBOR,
    Signer,
    SigningKey,
    kid_of,
    verify,
)
from agent.core.executor import STATE_FAMILY, actions_family
from agent.core.registry import Registry
from agent.errors import VerificationError

VIN = "WVWZZZ1JZXW000001"
NOW = 1_700_000_000_000
LIMITS = GateLimits(max_skew_ms=30_000, max_lifetime_ms=600_000, max_message_bytes=4096)
REGISTRY = Registry([actions_family(), STATE_FAMILY, updates.FAMILY])
PAYLOAD = {"v": 1, "vin": VIN, "seq": 3, "t0": NOW, "sig": {"Vehicle.Speed": [[0, 12.5]]}}
# A fixed P-256 key (RFC 6979 A.2.5's private scalar), so the kid is a known answer.
RFC6979_X = 0xC9AFA9D845BA75166B5C215767B1D6934E50C3DB36E89B127B8A622B120F6721
P256_KEY = ec.derive_private_key(RFC6979_X, ec.SECP256R1())
# The public point 04 || Ux || Uy as printed in RFC 6979 A.2.5; the kid is its sha256[:8].
RFC6979_POINT = bytes.fromhex(
    "04" "60FED4BA255A9D31C961EB74C6356D68C049B8923B61FA6CE669622E60F29FB6"
    "7903FE1008B8BC99A41AE9E95628BC64F2F1B20C2D7E9F5177A3C294D4462299")
RFC6979_KID = hashlib.sha256(RFC6979_POINT).digest()[:8]


def point(key) -> bytes:
    return key.public_key().public_bytes(Encoding.X962, PublicFormat.UncompressedPoint)


def ec2(key, private: bool = False) -> EC2Key:
    raw = point(key)
    d = key.private_numbers().private_value.to_bytes(32, "big") if private else b""
    return EC2Key(crv=P256, x=raw[1:33], y=raw[33:], d=d)


def pycose_decode(message: bytes) -> Sign1Message:
    outer = cbor2.loads(message)
    protected, unprotected, payload, signature = outer.value
    return Sign1Message.from_cose_obj([protected, dict(unprotected), payload, signature], True)


def raw_sign1(key, payload: bytes, alg: int, kid: bytes, der: bool = False) -> bytes:
    protected = cbor2.dumps({1: alg, 4: kid, 3: CT_CBOR})
    data = cbor2.dumps(["Signature1", protected, b"", payload])
    if isinstance(key, Ed25519PrivateKey):
        signature = key.sign(data)
    else:
        signature = key.sign(data, ec.ECDSA(SHA256()))
        if not der:
            r, s = decode_dss_signature(signature)
            signature = r.to_bytes(32, "big") + s.to_bytes(32, "big")
    return cbor2.dumps(cbor2.CBORTag(18, [protected, {}, payload, signature]))


def reason(message: bytes, keys) -> str:
    with pytest.raises(VerificationError) as info:
        verify(message, keys)
    return info.value.reason


def test_kid_is_sha256_of_the_uncompressed_point():
    assert point(P256_KEY) == RFC6979_POINT
    assert kid_of(P256_KEY.public_key()) == RFC6979_KID
    der = P256_KEY.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    assert der[-65:] == RFC6979_POINT  # SPKI ends with the BIT STRING holding the point


@pytest.mark.parametrize("compress", [False, True])
def test_round_trip_and_layout(compress):
    signer = Signer(P256_KEY)
    assert signer.alg == ALG_ES256 and signer.kid == RFC6979_KID
    message = signer.sign(PAYLOAD, compress=compress)
    protected, _, _, signature = cbor2.loads(message).value
    assert cbor2.loads(protected)[1] == -7 and len(signature) == 64
    result = verify(message, {signer.kid: signer.public_key})
    assert result.payload == PAYLOAD and result.alg == ALG_ES256


@pytest.mark.parametrize("compress", [False, True])
def test_pycose_verifies_our_es256_messages(compress):
    signer = Signer(P256_KEY)
    decoded = pycose_decode(signer.sign(PAYLOAD, compress=compress))
    assert decoded.phdr[Algorithm] is Es256 and decoded.phdr[KID] == RFC6979_KID
    decoded.key = ec2(P256_KEY)
    assert decoded.verify_signature()
    decoded.key = ec2(ec.generate_private_key(ec.SECP256R1()))
    assert not decoded.verify_signature()


def test_pycose_signed_es256_command_is_accepted_by_the_gate():
    cloud = ec.generate_private_key(ec.SECP256R1())
    kid = hashlib.sha256(point(cloud)).digest()[:8]
    gate = CommandGate(TrustStore([TrustedKey("p256-cloud", cloud.public_key(), ("charge.*",))]),
                       VIN, LIMITS, REGISTRY)
    body = {"v": 1, "id": "c-es256", "vin": VIN, "name": "charge.set_limit",
            "params": {"percent": 80}, "iat": NOW - 1000, "exp": NOW + 60_000}
    msg = Sign1Message(phdr={Algorithm: Es256, KID: kid, ContentType: CT_CBOR},
                       payload=cbor2.dumps(body))
    msg.key = ec2(cloud, private=True)
    outcome = gate.check(msg.encode(), NOW, lambda cid: None)
    assert isinstance(outcome, Accepted), outcome
    assert outcome.command.key_name == "p256-cloud" and outcome.command.params == {"percent": 80}

    # The same command signed by pycose with another P-256 key under that kid: refused.
    forged = Sign1Message(phdr={Algorithm: Es256, KID: kid, ContentType: CT_CBOR},
                          payload=cbor2.dumps(body))
    forged.key = ec2(ec.generate_private_key(ec.SECP256R1()), private=True)
    outcome = gate.check(forged.encode(), NOW, lambda cid: None)
    assert isinstance(outcome, Rejected) and outcome.reason == "BAD_SIGNATURE"


def test_alg_confusion_is_a_bad_signature():
    ed = Ed25519PrivateKey.generate()
    ed_kid, p_kid = kid_of(ed.public_key()), kid_of(P256_KEY.public_key())
    keys = {ed_kid: ed.public_key(), p_kid: P256_KEY.public_key()}
    body = cbor2.dumps(PAYLOAD)
    assert verify(raw_sign1(P256_KEY, body, -7, p_kid), keys).payload == PAYLOAD
    assert verify(raw_sign1(ed, body, -8, ed_kid), keys).payload == PAYLOAD
    # EdDSA claimed for the P-256 kid, ES256 for the Ed25519 kid: each signature is genuine.
    assert reason(raw_sign1(P256_KEY, body, -8, p_kid), keys) == "BAD_SIGNATURE"
    assert reason(raw_sign1(ed, body, -7, ed_kid), keys) == "BAD_SIGNATURE"
    # A pycose EdDSA message under the P-256 kid.
    msg = Sign1Message(phdr={Algorithm: EdDSA, KID: p_kid, ContentType: CT_CBOR}, payload=body)
    from cryptography.hazmat.primitives.serialization import NoEncryption, PrivateFormat
    msg.key = OKPKey(crv=Ed25519, x=ed.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw),
                     d=ed.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption()))
    assert reason(msg.encode(), keys) == "BAD_SIGNATURE"


def test_es256_signature_shapes():
    kid = kid_of(P256_KEY.public_key())
    keys = {kid: P256_KEY.public_key()}
    body = cbor2.dumps(PAYLOAD)
    assert reason(raw_sign1(P256_KEY, body, -7, kid, der=True), keys) == "BAD_SIGNATURE"  # DER
    good = cbor2.loads(raw_sign1(P256_KEY, body, -7, kid))
    protected, unprotected, payload, signature = good.value
    n = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551  # P-256 order
    r, s = int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big")
    variants = {
        "short": signature[:63],
        "long": signature + b"\x00",
        "zero r": bytes(32) + signature[32:],
        "s = n": signature[:32] + n.to_bytes(32, "big"),
        "flipped": signature[:-1] + bytes([signature[-1] ^ 1]),
    }
    for name, sig in variants.items():
        message = cbor2.dumps(cbor2.CBORTag(18, [protected, unprotected, payload, sig]))
        assert reason(message, keys) == "BAD_SIGNATURE", name
    # The malleated twin (r, n - s) is a valid ECDSA signature too (see the cose docstring).
    twin = signature[:32] + (n - s).to_bytes(32, "big")
    message = cbor2.dumps(cbor2.CBORTag(18, [protected, unprotected, payload, twin]))
    assert verify(message, keys).payload == PAYLOAD
    assert r > 0


def test_other_curves_are_refused():
    p384 = ec.generate_private_key(ec.SECP384R1())
    with pytest.raises(TypeError, match="P-256"):
        Signer(p384)
    with pytest.raises(TypeError):
        kid_of(p384.public_key())
    with pytest.raises(TypeError):
        TrustedKey("p384", p384.public_key(), ("*",))


class _CountingKey(SigningKey):
    """A key held 'elsewhere': only sign(bytes) -> bytes crosses over."""

    def __init__(self, private):
        self._private, self.alg, self.public_key = private, ALG_ES256, private.public_key()
        self.calls = 0

    def sign(self, data: bytes) -> bytes:
        self.calls += 1
        r, s = decode_dss_signature(self._private.sign(data, ec.ECDSA(SHA256())))
        return r.to_bytes(32, "big") + s.to_bytes(32, "big")


def test_signer_takes_a_sign_backend():
    backend = _CountingKey(P256_KEY)
    signer = Signer(backend)
    message = signer.sign(PAYLOAD)
    assert backend.calls == 1 and signer.kid == RFC6979_KID
    assert verify(message, {signer.kid: signer.public_key}).payload == PAYLOAD

    class Broken(_CountingKey):
        def sign(self, data):
            return b"\x00" * 10

    with pytest.raises(ValueError, match="not 64"):
        Signer(Broken(P256_KEY)).sign(PAYLOAD)

    class Mismatch(_CountingKey):
        alg = -8

    m = Mismatch(P256_KEY)
    m.alg = -8
    with pytest.raises(TypeError, match="does not match"):
        Signer(m)
