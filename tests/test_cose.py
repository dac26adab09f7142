"""COSE_Sign1 envelope (PROTOCOL.md §2): round trip, pycose interop, every rejection reason.

Hostile messages are built here with cbor2 and cryptography directly (not with our Signer),
so each one is correctly signed and would verify if the check under test were missing.
"""

from __future__ import annotations

import datetime
import hashlib
import tracemalloc
import zlib

import cbor2
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PrivateFormat, NoEncryption, PublicFormat
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pycose.algorithms import EdDSA
from pycose.headers import Algorithm, ContentType, KID
from pycose.keys import OKPKey
from pycose.keys.curves import Ed25519
from pycose.messages import Sign1Message

from agent.core.cose import (
    CT_CBOR,
    CT_CBOR_ZLIB,
    MAX_PAYLOAD,
    Signer,
    Verified,
    decode_unverified,
    kid_of,
    verify,
)
from agent.errors import VerificationError

# RFC 8032 §7.1 test 1; kid computed independently with `xxd -r -p | sha256sum`.
RFC8032_SECRET = bytes.fromhex("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60")
RFC8032_PUBLIC = bytes.fromhex("d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a")
RFC8032_KID = bytes.fromhex("21fe31dfa154a261")

PAYLOAD = {
    "v": 1,
    "vin": "WVWZZZ1JZXW000001",
    "seq": 7,
    "t0": 1_700_000_000_000,
    "sig": {"Vehicle.Speed": [[0, 12.5], [100, 13.0]], "Body.Lock": [[5, True]], "X.Y": [[9, None]]},
    "blob": b"\x00\x01",
    "neg": -3,
}


@pytest.fixture(scope="module")
def key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.from_private_bytes(RFC8032_SECRET)


@pytest.fixture(scope="module")
def signer(key) -> Signer:
    return Signer(key)


@pytest.fixture(scope="module")
def keys(signer):
    return {signer.kid: signer.public_key}


def raw_sign1(
    key: Ed25519PrivateKey,
    payload: bytes,
    *,
    content_type=CT_CBOR,
    alg=-8,
    kid: bytes | None = None,
    tag: int = 18,
    protected: bytes | None = None,
    unprotected=None,
    extra_header: dict | None = None,
) -> bytes:
    """A correctly signed COSE_Sign1 built independently of agent.core.cose."""
    if protected is None:
        header = {1: alg, 4: kid if kid is not None else kid_of(key.public_key()), 3: content_type}
        header.update(extra_header or {})
        protected = cbor2.dumps(header)
    signature = key.sign(cbor2.dumps(["Signature1", protected, b"", payload]))
    return cbor2.dumps(cbor2.CBORTag(tag, [protected, unprotected or {}, payload, signature]))


def reason(message: bytes, keys, **kw) -> str:
    with pytest.raises(VerificationError) as info:
        verify(message, keys, **kw)
    return info.value.reason


def flip_bit(data: bytes, index: int) -> bytes:
    return data[:index] + bytes([data[index] ^ 0x01]) + data[index + 1 :]


# --- round trip and encoding -------------------------------------------------------------


@pytest.mark.parametrize("compress", [None, False, True])
def test_round_trip(signer, keys, compress):
    message = signer.sign(PAYLOAD, compress=compress)
    result = verify(message, keys)
    assert isinstance(result, Verified)
    assert result.payload == PAYLOAD
    assert result.kid == signer.kid
    assert result.payload_bytes == cbor2.dumps(PAYLOAD, canonical=True)
    if compress is not None:
        assert result.content_type == (CT_CBOR_ZLIB if compress else CT_CBOR)


def test_message_layout_matches_protocol(signer):
    for compress, ct in ((False, CT_CBOR), (True, CT_CBOR_ZLIB)):
        message = signer.sign(PAYLOAD, compress=compress)
        outer = cbor2.loads(message)
        assert isinstance(outer, cbor2.CBORTag) and outer.tag == 18
        protected, unprotected, payload, signature = outer.value
        assert cbor2.loads(protected) == {1: -8, 4: signer.kid, 3: ct}
        assert dict(unprotected) == {}
        assert len(signature) == 64
        body = zlib.decompress(payload) if compress else payload
        assert cbor2.loads(body) == PAYLOAD
        # The signature is over the standard Sig_structure, encoded by cbor2 here.
        signer.public_key.verify(signature, cbor2.dumps(["Signature1", protected, b"", payload]))


def test_payload_is_canonical_cbor(signer, keys):
    a = {"b": 1, "a": 1.5, "ccc": [0.1, 65504.0]}
    b = {"ccc": [0.1, 65504.0], "a": 1.5, "b": 1}
    assert signer.sign(a, compress=False) == signer.sign(b, compress=False)
    body = verify(signer.sign(a, compress=False), keys).payload_bytes
    assert body == cbor2.dumps(a, canonical=True)
    assert bytes.fromhex("f93e00") in body  # 1.5 as a half-precision float (shortest form)
    assert bytes.fromhex("fb3fb999999999999a") in body  # 0.1 needs a double


def test_compression_only_when_smaller(signer, keys):
    repetitive = {"v": 1, "vin": "V", "sig": {"A.B": [[i * 10, 1.0] for i in range(200)]}}
    big = signer.sign(repetitive)
    assert verify(big, keys).content_type == CT_CBOR_ZLIB
    assert len(big) < len(signer.sign(repetitive, compress=False))

    tiny = {"v": 1, "vin": "V", "t": 5, "online": True}
    small = signer.sign(tiny)
    assert verify(small, keys).content_type == CT_CBOR
    assert len(small) <= len(signer.sign(tiny, compress=True))


def test_sign_rejects_payload_that_is_not_a_text_keyed_map(signer):
    with pytest.raises(TypeError):
        signer.sign([1, 2])  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        signer.sign({1: "a"})  # type: ignore[dict-item]
    with pytest.raises(ValueError):
        signer.sign({"big": b"\x00" * (MAX_PAYLOAD + 1)}, compress=True)


# --- kid -----------------------------------------------------------------------------------


def test_kid_known_answer(key, signer):
    assert key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw) == RFC8032_PUBLIC
    assert kid_of(key.public_key()) == RFC8032_KID
    assert signer.kid == RFC8032_KID


def test_kid_matches_independent_derivation_from_der():
    public = Ed25519PrivateKey.generate().public_key()
    der = public.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    # SubjectPublicKeyInfo for Ed25519: 12 fixed bytes, then the 32-byte raw key.
    assert der[:12] == bytes.fromhex("302a300506032b6570032100") and len(der) == 44
    assert kid_of(public) == hashlib.sha256(der[12:]).digest()[:8]


# --- interop with pycose -------------------------------------------------------------------


def pycose_decode(message: bytes) -> Sign1Message:
    """Sign1Message.decode(); pycose 1.1 cannot take cbor2 6's tuple-valued tags, so fall back
    to the exact steps decode() performs (loads, check tag, from_cose_obj on a list)."""
    try:
        return Sign1Message.decode(message)
    except TypeError:
        outer = cbor2.loads(message)
        assert isinstance(outer, cbor2.CBORTag) and outer.tag == 18
        protected, unprotected, payload, signature = outer.value
        return Sign1Message.from_cose_obj([protected, dict(unprotected), payload, signature], True)


def okp(key: Ed25519PrivateKey, private: bool = False) -> OKPKey:
    x = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    if not private:
        return OKPKey(crv=Ed25519, x=x)
    d = key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
    return OKPKey(crv=Ed25519, x=x, d=d)


@pytest.mark.parametrize("compress", [False, True])
def test_pycose_verifies_our_messages(key, signer, compress):
    message = signer.sign(PAYLOAD, compress=compress)
    decoded = pycose_decode(message)
    decoded.key = okp(key)
    assert decoded.verify_signature()
    assert decoded.phdr[KID] == signer.kid
    body = zlib.decompress(decoded.payload) if compress else decoded.payload
    assert cbor2.loads(body) == PAYLOAD

    other = Ed25519PrivateKey.generate()
    decoded.key = okp(other)
    assert not decoded.verify_signature()


@pytest.mark.parametrize("ct", [CT_CBOR, CT_CBOR_ZLIB])
def test_we_verify_pycose_messages(ct):
    cloud = Ed25519PrivateKey.generate()
    kid = hashlib.sha256(cloud.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)).digest()[:8]
    body = cbor2.dumps(PAYLOAD)
    if ct == CT_CBOR_ZLIB:
        body = zlib.compress(body)
    msg = Sign1Message(phdr={Algorithm: EdDSA, KID: kid, ContentType: ct}, payload=body)
    msg.key = okp(cloud, private=True)
    encoded = msg.encode()
    result = verify(encoded, {kid: cloud.public_key()})
    assert result.payload == PAYLOAD and result.kid == kid and result.content_type == ct

    tampered = flip_bit(encoded, len(encoded) - 1)
    assert reason(tampered, {kid: cloud.public_key()}) == "BAD_SIGNATURE"


# --- rejections ----------------------------------------------------------------------------


def test_untagged_and_wrong_tag(key, signer, keys):
    good = signer.sign(PAYLOAD)
    assert good[0] == 0xD2
    assert reason(good[1:], keys) == "BAD_ENVELOPE"  # the bare array, no tag 18
    body = cbor2.dumps(PAYLOAD)
    assert verify(raw_sign1(key, body), keys).payload == PAYLOAD
    assert reason(raw_sign1(key, body, tag=17), keys) == "BAD_ENVELOPE"  # COSE_Mac0 tag
    assert reason(raw_sign1(key, body, tag=98), keys) == "BAD_ENVELOPE"  # COSE_Sign tag


def test_not_an_array_of_four_or_wrong_types(signer, keys):
    protected, unprotected, payload, signature = cbor2.loads(signer.sign(PAYLOAD)).value
    variants = [
        [protected, unprotected, payload],
        [protected, unprotected, payload, signature, b""],
        [cbor2.loads(protected), unprotected, payload, signature],  # protected not a bstr
        [protected, [], payload, signature],  # unprotected not a map
        [protected, unprotected, None, signature],  # detached payload
        [protected, unprotected, payload, "sig"],
    ]
    for items in variants:
        assert reason(cbor2.dumps(cbor2.CBORTag(18, items)), keys) == "BAD_ENVELOPE", items
    assert reason(cbor2.dumps(cbor2.CBORTag(18, {"a": 1})), keys) == "BAD_ENVELOPE"
    assert reason(b"", keys) == "BAD_ENVELOPE"
    assert reason("not bytes", keys) == "BAD_ENVELOPE"  # type: ignore[arg-type]


def test_protected_header_not_a_map(key, keys):
    body = cbor2.dumps(PAYLOAD)
    assert reason(raw_sign1(key, body, protected=cbor2.dumps([1, -8])), keys) == "BAD_ENVELOPE"
    assert reason(raw_sign1(key, body, protected=b"\xff"), keys) == "BAD_ENVELOPE"
    assert reason(raw_sign1(key, body, protected=b""), keys) == "BAD_ENVELOPE"  # empty = no alg


@pytest.mark.parametrize("alg", [-35, -36, 8, -8.0, -7.0, None, "EdDSA"])
def test_wrong_alg(key, keys, alg):
    with pytest.raises(VerificationError) as info:
        verify(raw_sign1(key, cbor2.dumps(PAYLOAD), alg=alg), keys)
    assert info.value.reason == "BAD_ENVELOPE" and "alg" in str(info.value)


def test_es256_alg_on_an_ed25519_kid_is_a_bad_signature(key, keys):
    # -7 is a supported alg, but not for this key: alg confusion (PROTOCOL.md §2).
    with pytest.raises(VerificationError) as info:
        verify(raw_sign1(key, cbor2.dumps(PAYLOAD), alg=-7), keys)
    assert info.value.reason == "BAD_SIGNATURE" and "does not match" in str(info.value)


@pytest.mark.parametrize("ct", ["application/json", "application/cbor+gzip", 60, None, b"application/cbor"])
def test_unsupported_content_type(key, keys, ct):
    with pytest.raises(VerificationError) as info:
        verify(raw_sign1(key, cbor2.dumps(PAYLOAD), content_type=ct), keys)
    assert info.value.reason == "BAD_ENVELOPE" and "content type" in str(info.value)


def test_header_rules(key, keys):
    body = cbor2.dumps(PAYLOAD)
    kid = kid_of(key.public_key())
    assert reason(raw_sign1(key, body, extra_header={2: [3]}), keys) == "BAD_ENVELOPE"  # crit
    assert reason(raw_sign1(key, body, unprotected={4: kid}), keys) == "BAD_ENVELOPE"
    assert reason(raw_sign1(key, body, kid="not-bytes"), keys) == "BAD_ENVELOPE"
    # Other unprotected labels are ignored.
    assert verify(raw_sign1(key, body, unprotected={33: b"x"}), keys).payload == PAYLOAD
    # Duplicate labels would let two parsers disagree about the alg or kid.
    dup = bytes.fromhex("a3 01 27 01 26 04 40".replace(" ", ""))
    assert reason(raw_sign1(key, body, protected=dup), keys) == "BAD_ENVELOPE"


def test_unknown_kid(signer):
    other = Signer(Ed25519PrivateKey.generate())
    message = signer.sign(PAYLOAD)
    assert reason(message, {other.kid: other.public_key}) == "UNKNOWN_KEY"
    assert reason(message, {}) == "UNKNOWN_KEY"


def test_flipped_signature_bit(signer, keys):
    message = signer.sign(PAYLOAD)
    assert reason(flip_bit(message, len(message) - 1), keys) == "BAD_SIGNATURE"
    assert reason(flip_bit(message, len(message) - 64), keys) == "BAD_SIGNATURE"


@pytest.mark.parametrize("compress", [False, True])
def test_flipped_payload_bit(signer, keys, compress):
    message = signer.sign(PAYLOAD, compress=compress)
    body = cbor2.loads(message).value[2]
    start = message.index(body)
    for offset in (0, len(body) // 2, len(body) - 1):
        assert reason(flip_bit(message, start + offset), keys) == "BAD_SIGNATURE"


def test_signed_by_a_different_key_under_our_kid(signer, keys):
    impostor = Ed25519PrivateKey.generate()
    assert reason(raw_sign1(impostor, cbor2.dumps(PAYLOAD), kid=signer.kid), keys) == "BAD_SIGNATURE"


def test_check_order_kid_before_signature_before_payload(key, signer, keys):
    # Unknown kid with a broken signature: the kid is reported.
    message = signer.sign(PAYLOAD)
    assert reason(flip_bit(message, len(message) - 1), {}) == "UNKNOWN_KEY"
    # A garbage payload with a bad signature: signature first, payload never parsed.
    bad_body = raw_sign1(key, b"\xff\xff", content_type=CT_CBOR_ZLIB)
    assert reason(flip_bit(bad_body, len(bad_body) - 1), keys) == "BAD_SIGNATURE"
    assert reason(bad_body, keys) == "BAD_ENVELOPE"


def zlib_bomb(size: int = 50_000_000) -> bytes:
    packer = zlib.compressobj(9)
    chunk = bytes(1 << 20)
    parts = [packer.compress(chunk) for _ in range(size // len(chunk))]
    parts.append(packer.compress(bytes(size % len(chunk))))
    parts.append(packer.flush())
    return b"".join(parts)


def test_zlib_bomb_is_rejected_without_inflating_it(key, keys):
    bomb = zlib_bomb()
    assert len(bomb) < MAX_PAYLOAD  # small enough to pass the envelope size bound
    message = raw_sign1(key, bomb, content_type=CT_CBOR_ZLIB)
    tracemalloc.start()
    try:
        with pytest.raises(VerificationError) as info:
            verify(message, keys)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert info.value.reason == "BAD_ENVELOPE" and "decompression" in str(info.value)
    assert peak < 4 * MAX_PAYLOAD, f"verify allocated {peak} bytes for a 50 MB bomb"


@pytest.mark.parametrize("compress", [False, True])
def test_payload_size_limit_boundary(signer, keys, compress):
    message = signer.sign(PAYLOAD, compress=compress)
    size = len(cbor2.dumps(PAYLOAD, canonical=True))
    assert verify(message, keys, max_payload=size).payload == PAYLOAD
    assert reason(message, keys, max_payload=size - 1) == "BAD_ENVELOPE"


def test_oversized_message_refused_before_parsing():
    # Pure size: an unparseable blob with no known keys must still say BAD_ENVELOPE.
    huge = b"\xd2\x84" + b"\x00" * (MAX_PAYLOAD + 10_000)
    with pytest.raises(VerificationError) as info:
        verify(huge, {})
    assert info.value.reason == "BAD_ENVELOPE" and "bound" in str(info.value)


def test_zlib_stream_defects(key, keys):
    body = zlib.compress(cbor2.dumps(PAYLOAD))
    gz = zlib.compressobj(wbits=31)
    gzipped = gz.compress(cbor2.dumps(PAYLOAD)) + gz.flush()
    raw_deflate = zlib.compressobj(wbits=-15)
    deflated = raw_deflate.compress(cbor2.dumps(PAYLOAD)) + raw_deflate.flush()
    assert verify(raw_sign1(key, body, content_type=CT_CBOR_ZLIB), keys).payload == PAYLOAD
    for bad in (body[:-3], body + b"\x00", gzipped, deflated, b"", cbor2.dumps(PAYLOAD)):
        assert reason(raw_sign1(key, bad, content_type=CT_CBOR_ZLIB), keys) == "BAD_ENVELOPE"


@pytest.mark.parametrize(
    "body",
    [
        cbor2.dumps([1, 2, 3]),  # not a map
        cbor2.dumps("v"),
        cbor2.dumps({1: "int key"}),
        cbor2.dumps({"v": 1, 2: "mixed keys"}),
        b"\xff",  # not CBOR
        b"",
        cbor2.dumps({"v": 1}) + b"\x00",  # trailing bytes
        bytes.fromhex("a2617601617602"),  # {"v": 1, "v": 2}: duplicate key
        cbor2.dumps({"t": datetime.datetime(2024, 1, 1, tzinfo=datetime.timezone.utc)}),  # tag 0
        cbor2.dumps({"n": 1 << 70}),  # bignum tag 2
        cbor2.dumps({"s": {1, 2}}),  # tag 258
        cbor2.dumps({"x": cbor2.CBORTag(4242, 1)}),  # unknown tag
        cbor2.dumps({"u": cbor2.undefined}),
        cbor2.dumps(cbor2.CBORTag(55799, {"v": 1})),  # self-described map decodes as frozendict
        bytes.fromhex("a16161d81c81d81d00"),  # {"a": shareable [ sharedref 0 ]}: a cycle
        bytes.fromhex("a1616182d81c80d81d00"),  # the same list twice via a shared reference
    ],
)
def test_payload_not_a_plain_text_keyed_map(key, keys, body):
    assert reason(raw_sign1(key, body), keys) == "BAD_ENVELOPE"
    assert reason(raw_sign1(key, zlib.compress(body), content_type=CT_CBOR_ZLIB), keys) == "BAD_ENVELOPE"


def test_trailing_bytes_after_message(signer, keys):
    assert reason(signer.sign(PAYLOAD) + b"\x00", keys) == "BAD_ENVELOPE"


def test_decode_unverified(signer):
    message = signer.sign(PAYLOAD, compress=True)
    tampered = flip_bit(message, len(message) - 1)
    assert decode_unverified(tampered) == (signer.kid, CT_CBOR_ZLIB, PAYLOAD)
    with pytest.raises(VerificationError) as info:
        decode_unverified(message[1:])
    assert info.value.reason == "BAD_ENVELOPE"


# --- fuzzing: any input gives Verified or VerificationError --------------------------------

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

cbor_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8) | st.binary(max_size=8),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=4) | st.integers(), children, max_size=4)
    | st.builds(cbor2.CBORTag, st.integers(0, 2**64 - 1), children),
    max_leaves=12,
)


def only_verification_errors(message: bytes, keys) -> None:
    try:
        verify(message, keys)
    except VerificationError as exc:
        assert exc.reason in {"BAD_ENVELOPE", "UNKNOWN_KEY", "BAD_SIGNATURE"}
    try:
        decode_unverified(message)
    except VerificationError as exc:
        assert exc.reason == "BAD_ENVELOPE"


def safe_dumps(value) -> bytes | None:
    try:
        return cbor2.dumps(value)
    except Exception:  # some generated tags (e.g. 258 around a list of lists) do not encode
        return None


@FUZZ
@given(st.binary(max_size=512))
def test_fuzz_arbitrary_bytes(keys, data):
    only_verification_errors(data, keys)
    only_verification_errors(b"\xd2\x84" + data, keys)


@FUZZ
@given(st.data())
def test_fuzz_mutated_valid_messages(signer, keys, data):
    message = bytearray(signer.sign(PAYLOAD, compress=data.draw(st.booleans())))
    for _ in range(data.draw(st.integers(1, 4))):
        index = data.draw(st.integers(0, len(message) - 1))
        message[index] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(message)))
    only_verification_errors(bytes(message[:cut]), keys)
    only_verification_errors(bytes(message), keys)


@FUZZ
@given(header=st.dictionaries(st.integers(-10, 10), cbor_values, max_size=4), items=st.lists(cbor_values, max_size=5))
def test_fuzz_structured_envelopes(keys, header, items):
    protected = safe_dumps(header)
    if protected is not None:
        envelope = safe_dumps(cbor2.CBORTag(18, [protected, *items]))
        if envelope is not None:
            only_verification_errors(envelope, keys)


@FUZZ
@given(body=st.one_of(st.binary(max_size=256), cbor_values.map(safe_dumps).filter(bool)), packed=st.booleans())
def test_fuzz_correctly_signed_arbitrary_payloads(key, keys, body, packed):
    # Correctly signed, so the payload decoder itself is what gets fuzzed.
    if packed:
        message = raw_sign1(key, zlib.compress(body), content_type=CT_CBOR_ZLIB)
    else:
        message = raw_sign1(key, body)
    only_verification_errors(message, keys)


# --- tags that decode to plain data (issue: bignum iat/exp/v/percent, self-describe) ---------

def _bignum(n: int) -> cbor2.CBORTag:
    return cbor2.CBORTag(2, n.to_bytes(max(1, (n.bit_length() + 7) // 8), "big"))


COMMAND = {"v": 1, "id": "c-1", "vin": "V1", "name": "charge.set_limit",
           "params": {"percent": 80}, "iat": 1_700_000_000_000, "exp": 1_700_000_060_000}


@pytest.mark.parametrize("path", ["v", "iat", "exp", "percent"])
def test_small_bignums_are_refused(key, keys, path):
    # 2(h'01') decodes to the int 1 in cbor2: it would pass for a plain integer.
    body = dict(COMMAND, params=dict(COMMAND["params"]))
    if path == "percent":
        body["params"]["percent"] = _bignum(80)
    else:
        body[path] = _bignum(body[path])
    encoded = cbor2.dumps(body)
    assert cbor2.loads(encoded) == COMMAND  # the same values once decoded
    with pytest.raises(VerificationError) as info:
        verify(raw_sign1(key, encoded), keys)
    assert info.value.reason == "BAD_ENVELOPE" and "tag 2" in str(info.value)


def test_negative_bignum_and_string_references_are_refused(key, keys):
    assert reason(raw_sign1(key, cbor2.dumps({"v": cbor2.CBORTag(3, b"\x00")})), keys) == "BAD_ENVELOPE"
    # 256({"a": "vin", "b": 25(0)}): a string reference decodes to a plain text string.
    stringref = bytes.fromhex("d90100a261616376696e6162d81900")
    assert cbor2.loads(stringref) == {"a": "vin", "b": "vin"}
    assert reason(raw_sign1(key, stringref), keys) == "BAD_ENVELOPE"


def test_crit_in_the_unprotected_header_is_refused(key, keys):
    body = cbor2.dumps(PAYLOAD)
    with pytest.raises(VerificationError) as info:
        verify(raw_sign1(key, body, unprotected={2: [33]}), keys)
    assert info.value.reason == "BAD_ENVELOPE" and "critical" in str(info.value)


def test_self_describe_prefix_is_refused(key, signer, keys):
    good = signer.sign(PAYLOAD)
    prefixed = b"\xd9\xd9\xf7" + good
    assert cbor2.loads(prefixed).tag == 18  # cbor2 alone would strip it silently
    with pytest.raises(VerificationError) as info:
        verify(prefixed, keys)
    assert info.value.reason == "BAD_ENVELOPE" and "55799" in str(info.value)
    # Inside the tag, around the protected header's map: refused too.
    header = b"\xd9\xd9\xf7" + cbor2.dumps({1: -8, 4: kid_of(key.public_key()), 3: CT_CBOR})
    assert reason(raw_sign1(key, cbor2.dumps(PAYLOAD), protected=header), keys) == "BAD_ENVELOPE"
