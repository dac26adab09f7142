"""The command gate (agent.core.commands): every reason code from real signed COSE messages.

Messages are signed with real Ed25519 keys, either with our Signer or, for hostile ones, built
here with cbor2 + cryptography directly, so each would pass if the check under test were gone.
"""

from __future__ import annotations

import hashlib
import zlib

import cbor2
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.core import protocol as p
from agent.core import updates
from agent.core.commands import (
    Accepted,
    CommandGate,
    GateLimits,
    Redelivery,
    Rejected,
    TrustedKey,
    TrustStore,
)
from agent.core.protocol import response_payload
from agent.core.ratelimit import TokenBucket
from agent.core.cose import Signer, kid_of
from agent.core.executor import STATE_FAMILY, actions_family
from agent.core.registry import Registry

VIN = "WVWZZZ1JZXW000001"
NOW = 1_700_000_000_000
LIMITS = GateLimits(max_skew_ms=30_000, max_lifetime_ms=600_000, max_message_bytes=4096)
REGISTRY = Registry([actions_family(), STATE_FAMILY, updates.FAMILY])  # the v1 families
NO_PARAMS = ("charge.start", "charge.stop", "doors.lock", "doors.unlock", "state.snapshot",
             "update.cancel")

OPS = Ed25519PrivateKey.generate()  # charge.*, doors.*, state.snapshot, update.*
VIEWER = Ed25519PrivateKey.generate()  # state.snapshot only
ADMIN = Ed25519PrivateKey.generate()  # "*"
STRANGER = Ed25519PrivateKey.generate()  # not in the trust store

STORE = TrustStore([
    TrustedKey("ops", OPS.public_key(), ("charge.*", "doors.*", "state.snapshot", "update.*")),
    TrustedKey("viewer", VIEWER.public_key(), ("state.snapshot",)),
    TrustedKey("admin", ADMIN.public_key(), ("*",)),
])


def command(**over) -> dict:
    body = {"v": 1, "id": "c-1", "vin": VIN, "name": "charge.start", "params": {},
            "iat": NOW - 1000, "exp": NOW + 60_000}
    body.update(over)
    return {k: v for k, v in body.items() if v is not DROP}


DROP = object()


def signed(key=OPS, compress=False, **over) -> bytes:
    return Signer(key).sign(command(**over), compress=compress)


def raw_sign1(sign_with, payload: bytes, kid: bytes, unprotected=None,
              content_type="application/cbor") -> bytes:
    """A COSE_Sign1 built without our Signer: any kid, any signer, any unprotected header."""
    protected = cbor2.dumps({1: -8, 4: kid, 3: content_type}, canonical=True)
    to_sign = cbor2.dumps(["Signature1", protected, b"", payload])
    signature = sign_with.sign(to_sign)
    return cbor2.dumps(cbor2.CBORTag(18, [protected, unprotected or {}, payload, signature]))


class Memory:
    """The replay lookup, as a dict; counts calls so tests can see whether it ran."""

    def __init__(self):
        self.digests: dict[str, bytes] = {}
        self.calls = 0

    def seen(self, cid: str):
        self.calls += 1
        return self.digests.get(cid)


@pytest.fixture
def gate() -> CommandGate:
    return CommandGate(STORE, VIN, LIMITS, REGISTRY)


@pytest.fixture
def memory() -> Memory:
    return Memory()


def check(gate, message, memory=None, now=NOW):
    return gate.check(message, now, (memory or Memory()).seen)


def rejected(outcome, reason, cid="c-1", detail=None) -> Rejected:
    assert isinstance(outcome, Rejected), outcome
    assert (outcome.reason, outcome.id) == (reason, cid), outcome
    if detail is not None:
        assert detail in outcome.detail, outcome
    return outcome


# -- accepted ----------------------------------------------------------------------------------

def test_accepted_command_carries_everything(gate):
    message = signed(name="charge.set_limit", params={"percent": 80})
    outcome = check(gate, message)
    assert isinstance(outcome, Accepted)
    cmd = outcome.command
    assert (cmd.id, cmd.vin, cmd.name, dict(cmd.params)) == ("c-1", VIN, "charge.set_limit",
                                                            {"percent": 80})
    assert (cmd.iat, cmd.exp, cmd.key_name) == (NOW - 1000, NOW + 60_000, "ops")
    assert cmd.kid == kid_of(OPS.public_key())
    assert cmd.digest == hashlib.sha256(cbor2.dumps(command(name="charge.set_limit",
                                                            params={"percent": 80}),
                                                    canonical=True)).digest()
    with pytest.raises(TypeError):
        cmd.params["percent"] = 100  # read-only


@pytest.mark.parametrize("name,params", [
    *[(n, {}) for n in NO_PARAMS],
    ("charge.set_limit", {"percent": 50}),
    ("charge.set_limit", {"percent": 100}),
    ("update.stage", {"target": "tcu-fw-2.1.0.img", "repository": "https://tuf.example.com/repo"}),
    ("update.stage", {"target": "fw", "repository": "http://10.0.0.5:8080"}),
    ("update.activate", {"target": "tcu-fw-2.1.0.img"}),
])
def test_every_v1_command_with_valid_params_is_accepted(gate, name, params):
    outcome = check(gate, signed(ADMIN, name=name, params=params))
    assert isinstance(outcome, Accepted), outcome
    assert outcome.command.name == name


def test_compressed_command_is_accepted(gate):
    message = signed(compress=True, name="state.snapshot")
    assert cbor2.loads(cbor2.loads(message).value[0])[3] == "application/cbor+zlib"
    assert isinstance(check(gate, message), Accepted)


# -- envelope, key, signature: id is never read from an unverified payload -----------------------

@pytest.mark.parametrize("message", [b"", b"\x00", b"garbage", cbor2.dumps([1, 2, 3]),
                                     cbor2.dumps(cbor2.CBORTag(98, [b"", {}, b"", b""])),
                                     "not bytes", None, 12])
def test_garbage_is_bad_envelope_without_id(gate, message):
    rejected(check(gate, message), p.BAD_ENVELOPE, cid=None)


def test_oversized_message_is_bad_envelope(gate):
    big = signed(params={"pad": "x" * 4096})
    rejected(check(gate, big), p.BAD_ENVELOPE, cid=None, detail="over the 4096-byte limit")
    # The same message fits a gate allowing more: the bound is the configured one.
    roomy = CommandGate(STORE, VIN, GateLimits(max_message_bytes=65536), REGISTRY)
    rejected(check(roomy, big), p.BAD_PARAMS)


def test_payload_that_is_not_a_map_is_bad_envelope(gate):
    message = raw_sign1(OPS, cbor2.dumps(["c-1", VIN]), kid_of(OPS.public_key()))
    rejected(check(gate, message), p.BAD_ENVELOPE, cid=None)


def test_unknown_key(gate):
    rejected(check(gate, signed(STRANGER)), p.UNKNOWN_KEY, cid=None)


def test_forged_signature_by_another_key_under_a_trusted_kid(gate):
    payload = cbor2.dumps(command(), canonical=True)
    forged = raw_sign1(STRANGER, payload, kid_of(OPS.public_key()))
    rejected(check(gate, forged), p.BAD_SIGNATURE, cid=None)
    # Control: the same construction with the right key verifies.
    assert isinstance(check(gate, raw_sign1(OPS, payload, kid_of(OPS.public_key()))), Accepted)


def test_bit_flips_in_signature_or_payload_are_bad_signature(gate):
    good = signed()
    flipped_sig = good[:-1] + bytes([good[-1] ^ 1])
    rejected(check(gate, flipped_sig), p.BAD_SIGNATURE, cid=None)
    at = good.index(b"c-1")  # inside the payload: c-1 -> c-0
    flipped_payload = good[:at + 2] + b"0" + good[at + 3:]
    rejected(check(gate, flipped_payload), p.BAD_SIGNATURE, cid=None)


# -- payload schema ------------------------------------------------------------------------------

@pytest.mark.parametrize("field", ["v", "vin", "name", "params", "iat", "exp"])
def test_missing_field_is_bad_envelope_naming_it_and_keeps_the_id(gate, field):
    outcome = rejected(check(gate, signed(**{field: DROP})), p.BAD_ENVELOPE)
    assert outcome.detail.startswith(f"{field}:")


def test_missing_id_gives_no_id(gate):
    outcome = rejected(check(gate, signed(id=DROP)), p.BAD_ENVELOPE, cid=None)
    assert outcome.detail.startswith("id:")


@pytest.mark.parametrize("bad_id", ["", "x" * 65, "a/b", "a b", "ü", "ok\n", 7, None, b"c-1"])
def test_invalid_id_is_bad_envelope_without_id(gate, bad_id):
    outcome = rejected(check(gate, signed(id=bad_id)), p.BAD_ENVELOPE, cid=None)
    assert outcome.detail.startswith("id:")


def test_longest_and_widest_valid_id(gate):
    cid = ("Az09._:-" * 8)[:64]
    outcome = check(gate, signed(id=cid))
    assert isinstance(outcome, Accepted) and outcome.command.id == cid


@pytest.mark.parametrize("over,field", [
    ({"v": 2}, "v"), ({"v": True}, "v"), ({"v": 1.0}, "v"), ({"v": "1"}, "v"),
    ({"vin": 5}, "vin"), ({"name": ["charge.start"]}, "name"), ({"name": None}, "name"),
    ({"params": []}, "params"), ({"params": None}, "params"), ({"params": {1: 2}}, "params"),
    ({"iat": -1}, "iat"), ({"iat": True}, "iat"), ({"iat": 1.5e12}, "iat"),
    ({"exp": "soon"}, "exp"), ({"exp": NOW - 1000}, "exp"), ({"exp": NOW - 2000}, "exp"),
    ({"nbf": NOW}, "'nbf'"),
])
def test_invalid_field_is_bad_envelope_and_keeps_the_id(gate, over, field):
    outcome = rejected(check(gate, signed(**over)), p.BAD_ENVELOPE)
    assert outcome.detail.startswith(f"{field}:"), outcome


# -- vehicle, time window --------------------------------------------------------------------------

def test_wrong_vehicle(gate):
    rejected(check(gate, signed(vin="OTHERVIN000000000")), p.WRONG_VEHICLE)


def test_expired(gate):
    rejected(check(gate, signed(exp=NOW - 1)), p.EXPIRED)
    rejected(check(gate, signed(exp=NOW)), p.EXPIRED)  # exp <= now
    assert isinstance(check(gate, signed(exp=NOW + 1)), Accepted)


def test_issued_in_the_future(gate):
    skew = LIMITS.max_skew_ms
    rejected(check(gate, signed(iat=NOW + skew + 1, exp=NOW + skew + 60_000)), p.EXPIRED,
             detail="issued in the future")
    assert isinstance(check(gate, signed(iat=NOW + skew, exp=NOW + skew + 60_000)), Accepted)


def test_lifetime_too_long(gate):
    life = LIMITS.max_lifetime_ms
    rejected(check(gate, signed(iat=NOW - 1, exp=NOW - 1 + life + 1)), p.EXPIRED,
             detail="lifetime too long")
    assert isinstance(check(gate, signed(iat=NOW - 1, exp=NOW - 1 + life)), Accepted)


# -- replay and re-delivery --------------------------------------------------------------------------

def accept_into(gate, memory, message, now=NOW):
    """Check and record like the runtime does."""
    outcome = check(gate, message, memory, now)
    assert isinstance(outcome, Accepted), outcome
    memory.digests[outcome.command.id] = outcome.command.digest
    return outcome


def test_same_id_other_bytes_is_replayed(gate, memory):
    accept_into(gate, memory, signed(name="doors.lock"))
    rejected(check(gate, signed(name="doors.unlock"), memory), p.REPLAYED)


def test_identical_redelivery(gate, memory):
    message = signed(name="doors.lock")
    accept_into(gate, memory, message)
    assert check(gate, message, memory) == Redelivery("c-1")


def test_redelivery_after_exp_still_gets_its_status(gate, memory):
    message = signed(name="doors.lock")
    accept_into(gate, memory, message)
    assert check(gate, message, memory, now=NOW + 10 * 60_000) == Redelivery("c-1")
    # Without the record it would have been EXPIRED: the ordering is what makes the difference.
    rejected(check(gate, message, Memory(), now=NOW + 10 * 60_000), p.EXPIRED)


def test_redelivery_is_judged_on_signed_bytes_not_malleable_envelope(gate, memory):
    payload = cbor2.dumps(command(name="doors.lock"), canonical=True)
    kid = kid_of(OPS.public_key())
    accept_into(gate, memory, raw_sign1(OPS, payload, kid))
    # Anyone can add an unprotected header label without the key: still the same command,
    # so it must not become a REJECTED REPLAYED for an id that is in flight.
    tampered = raw_sign1(OPS, payload, kid, unprotected={99: b"x"})
    assert check(gate, tampered, memory) == Redelivery("c-1")
    # The same payload sent compressed is the same command too.
    zipped = raw_sign1(OPS, zlib.compress(payload), kid, content_type="application/cbor+zlib")
    assert check(gate, zipped, memory) == Redelivery("c-1")


def test_redelivery_needs_a_still_trusted_key(gate, memory):
    message = signed(name="doors.lock")
    accept_into(gate, memory, message)
    gate.replace_trust(TrustStore([e for e in STORE.entries if e.name != "ops"]))
    rejected(check(gate, message, memory), p.UNKNOWN_KEY, cid=None)


def test_replay_loss_refuses_commands_issued_before_it(gate, memory):
    lost_at = NOW - 5_000
    gate.note_replay_loss(lost_at)
    floor = lost_at + LIMITS.max_skew_ms
    rejected(check(gate, signed(iat=floor - 1, exp=NOW + 60_000)), p.REPLAYED,
             detail="replay memory")
    assert isinstance(check(gate, signed(iat=floor, exp=NOW + 60_000)), Accepted)
    gate.note_replay_loss(None)  # nothing lost: no change
    gate.note_replay_loss(lost_at - 100_000)  # an older loss never lowers the floor
    rejected(check(gate, signed(iat=floor - 1, exp=NOW + 60_000)), p.REPLAYED)


def test_loss_noted_during_the_lookup_applies_to_that_command(gate):
    def seen(cid):  # the store recovers from corruption inside seen() and reports the loss
        gate.note_replay_loss(NOW)
    rejected(gate.check(signed(), NOW, seen), p.REPLAYED)


def test_failing_replay_lookup_fails_closed(gate):
    def seen(cid):
        raise OSError("disk gone")
    rejected(gate.check(signed(), NOW, seen), p.INTERNAL_ERROR, detail="disk gone")


# -- authorisation, command, parameters ---------------------------------------------------------------

def test_key_not_allowed_that_command(gate):
    outcome = rejected(check(gate, signed(VIEWER, name="charge.start")), p.UNAUTHORIZED,
                       detail="viewer")
    assert isinstance(check(gate, signed(VIEWER, name="state.snapshot")), Accepted)
    # A rejection of an authentic, fresh command is to be recorded like an accepted one.
    assert outcome.digest is not None and outcome.exp == NOW + 60_000


def test_globs_are_case_sensitive(gate):
    rejected(check(gate, signed(name="CHARGE.start")), p.UNAUTHORIZED)


def test_unknown_command(gate):
    outcome = rejected(check(gate, signed(ADMIN, name="horn.honk")), p.UNKNOWN_COMMAND)
    assert outcome.digest is not None


@pytest.mark.parametrize("name,params", [
    ("charge.set_limit", {}),
    ("charge.set_limit", {"percent": 49}),
    ("charge.set_limit", {"percent": 101}),
    ("charge.set_limit", {"percent": True}),
    ("charge.set_limit", {"percent": 80.0}),
    ("charge.set_limit", {"percent": "80"}),
    ("charge.set_limit", {"percent": 80, "now": True}),
    ("update.stage", {"target": "fw"}),
    ("update.stage", {"repository": "https://tuf.example.com"}),
    ("update.stage", {"target": "fw", "repository": "ftp://tuf.example.com"}),
    ("update.stage", {"target": "fw", "repository": "https://"}),
    ("update.stage", {"target": "fw", "repository": "tuf.example.com/repo"}),
    ("update.stage", {"target": "fw", "repository": "https://host:99999/"}),
    ("update.stage", {"target": "fw", "repository": "https://ho st/"}),
    ("update.stage", {"target": "fw", "repository": 5}),
    ("update.stage", {"target": "fw", "repository": "https://tuf.example.com/repo#main"}),
    ("update.stage", {"target": "fw", "repository": "https://tuf.example.com/fleet/../evil"}),
    ("update.stage", {"target": "fw", "repository": "https://tuf.example.com/fleet/%2e%2e/x"}),
    ("update.stage", {"target": "fw", "repository": "https://tuf.example.com/fleet/./x"}),
    ("update.stage", {"target": "fw", "repository": "https://tuf.example.com/repo?v=1"}),
    ("update.stage", {"target": "", "repository": "https://tuf.example.com"}),
    ("update.stage", {"target": 3, "repository": "https://tuf.example.com"}),
    ("update.stage", {"target": "a\nb", "repository": "https://tuf.example.com"}),
    ("update.activate", {}),
    ("update.activate", {"target": None}),
    ("update.activate", {"target": "fw", "force": True}),
    *[(n, {"x": 1}) for n in NO_PARAMS],
])
def test_bad_params(gate, name, params):
    outcome = rejected(check(gate, signed(ADMIN, name=name, params=params)), p.BAD_PARAMS)
    assert outcome.digest is not None and outcome.exp is not None


# -- the order of the checks --------------------------------------------------------------------------

def test_order_oversized_before_unknown_key(gate):
    rejected(check(gate, signed(STRANGER, params={"pad": "x" * 5000})), p.BAD_ENVELOPE, cid=None)


def test_order_unknown_key_before_garbage_payload(gate):
    message = raw_sign1(STRANGER, b"\xff\xfe not cbor", kid_of(STRANGER.public_key()))
    rejected(check(gate, message), p.UNKNOWN_KEY, cid=None)


def test_order_bad_signature_before_garbage_payload(gate):
    message = raw_sign1(STRANGER, b"\xff\xfe not cbor", kid_of(OPS.public_key()))
    rejected(check(gate, message), p.BAD_SIGNATURE, cid=None)


def test_order_schema_before_vin(gate):
    outcome = rejected(check(gate, signed(vin="OTHER", iat="x")), p.BAD_ENVELOPE)
    assert outcome.detail.startswith("iat:")


def test_order_vin_before_time_window(gate):
    rejected(check(gate, signed(vin="OTHER", exp=NOW - 1)), p.WRONG_VEHICLE)


def test_order_time_window_before_replay(gate, memory):
    accept_into(gate, memory, signed(name="doors.lock"))
    rejected(check(gate, signed(name="doors.unlock", exp=NOW - 1), memory), p.EXPIRED)


def test_order_within_time_window(gate):
    rejected(check(gate, signed(iat=NOW + 10**9, exp=NOW + 2 * 10**9)), p.EXPIRED,
             detail="issued in the future")
    rejected(check(gate, signed(iat=NOW + 10**9, exp=NOW - 1)), p.BAD_ENVELOPE)  # exp <= iat


def test_order_replay_before_authorisation(gate, memory):
    accept_into(gate, memory, signed(name="doors.lock"))
    rejected(check(gate, signed(VIEWER, name="doors.unlock"), memory), p.REPLAYED)


def test_order_authorisation_before_command_known_before_params(gate):
    rejected(check(gate, signed(name="horn.honk", params={"x": 1})), p.UNAUTHORIZED)
    rejected(check(gate, signed(ADMIN, name="horn.honk", params={"x": 1})), p.UNKNOWN_COMMAND)


def test_replay_lookup_not_consulted_for_unverified_or_foreign_messages(gate, memory):
    for message in (b"junk", signed(STRANGER), signed(vin="OTHER"), signed(v=2)):
        assert isinstance(check(gate, message, memory), Rejected)
    assert memory.calls == 0
    check(gate, signed(), memory)
    assert memory.calls == 1


def test_early_rejections_are_not_to_be_recorded(gate, memory):
    accept_into(gate, memory, signed(name="doors.lock"))
    for message in (signed(vin="OTHER"), signed(exp=NOW - 1), signed(name="doors.unlock"),
                    signed(v=2)):
        outcome = check(gate, message, memory)
        assert isinstance(outcome, Rejected) and outcome.digest is None and outcome.exp is None


# -- never raises ------------------------------------------------------------------------------------

@settings(max_examples=400, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(st.binary(max_size=600))
def test_arbitrary_bytes_are_bad_envelope_and_never_raise(gate, data):
    outcome = check(gate, data)
    assert outcome == Rejected(None, p.BAD_ENVELOPE, outcome.detail)


_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**64, 2**64 - 1) | st.floats() | st.text(max_size=8)
    | st.binary(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8)


@settings(max_examples=300, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(st.dictionaries(st.sampled_from(["v", "id", "vin", "name", "params", "iat", "exp", "x"]),
                       _values, max_size=8))
def test_arbitrary_signed_payloads_never_raise(gate, payload):
    outcome = check(gate, Signer(ADMIN).sign(payload, compress=False))
    assert isinstance(outcome, Rejected)  # no random map is a valid command for this vehicle
    assert outcome.reason != p.INTERNAL_ERROR, outcome


# -- status payloads, token bucket, trust store -------------------------------------------------------

def test_status_payload_omits_absent_keys():
    assert response_payload(VIN, None, NOW, p.REJECTED, p.BAD_ENVELOPE) == {
        "v": 1, "vin": VIN, "id": None, "t": NOW, "status": "REJECTED", "reason": "BAD_ENVELOPE"}
    full = response_payload(VIN, "c-1", NOW, p.IN_PROGRESS, detail="downloading", progress=40)
    assert full == {"v": 1, "vin": VIN, "id": "c-1", "t": NOW, "status": "IN_PROGRESS",
                    "detail": "downloading", "progress": 40}
    done = response_payload(VIN, "c-1", NOW, p.SUCCEEDED, result={"percent": 80})
    assert done["result"] == {"percent": 80} and "reason" not in done


@pytest.mark.parametrize("args", [
    ("c-1", NOW, "DONE"),
    ("c-1", NOW, p.REJECTED),  # reason required
    ("c-1", NOW, p.SUCCEEDED, p.BUSY),  # reason not allowed
    ("c-1", NOW, p.FAILED, "OOPS"),
    ("c-1", NOW, p.IN_PROGRESS, None, None, 101),
    ("c-1", NOW, p.IN_PROGRESS, None, None, True),
])
def test_status_payload_refuses_what_section_7_does_not_allow(args):
    with pytest.raises(ValueError):
        response_payload(VIN, *args)


def test_reason_constants_match_section_7():
    section7 = ["BAD_ENVELOPE", "BAD_SIGNATURE", "UNKNOWN_KEY", "UNAUTHORIZED", "WRONG_VEHICLE",
                "EXPIRED", "REPLAYED", "UNKNOWN_COMMAND", "BAD_PARAMS", "PRECONDITION_FAILED",
                "BUSY", "WRITE_FAILED", "NO_RESPONSE", "DOWNLOAD_FAILED", "VERIFICATION_FAILED",
                "INSTALL_FAILED", "CANCELLED", "SUPERSEDED", "INTERNAL_ERROR"]
    assert p.REASONS == set(section7)
    assert all(getattr(p, r) == r for r in section7)


def test_token_bucket():
    bucket = TokenBucket(rate_per_s=2.0, burst=3)
    assert [bucket.take(0) for _ in range(4)] == [True, True, True, False]
    assert bucket.take(499) is False  # 0.998 tokens
    assert bucket.take(500) is True  # 1 token after 500 ms at 2/s
    assert bucket.take(500) is False
    assert [bucket.take(100_000) for _ in range(4)] == [True, True, True, False]  # capped at burst
    assert bucket.take(50_000) is False  # clock stepped back: no refill
    assert bucket.take(50_500) is True


def test_trust_store_lookup_and_duplicates():
    ops = STORE.get(kid_of(OPS.public_key()))
    assert ops is not None and ops.name == "ops" and ops.allows("charge.stop")
    assert not ops.allows("horn.honk")
    assert STORE.get(kid_of(STRANGER.public_key())) is None and len(STORE) == 3
    with pytest.raises(ValueError, match="same key"):
        TrustStore([TrustedKey("a", OPS.public_key(), ("*",)), TrustedKey("b", OPS.public_key(), ("*",))])
    with pytest.raises(ValueError, match="duplicate"):
        TrustStore([TrustedKey("a", OPS.public_key(), ("*",)), TrustedKey("a", ADMIN.public_key(), ("*",))])


# -- the registry the gate consults -------------------------------------------------------------

def test_a_name_claimed_twice_is_refused():
    from agent.core.registry import Family, no_params

    with pytest.raises(ValueError, match="state.snapshot"):
        Registry([STATE_FAMILY, Family("other", frozenset({"state.snapshot"}), no_params)])
    with pytest.raises(ValueError, match="registered twice"):
        Registry([STATE_FAMILY, STATE_FAMILY])
    assert REGISTRY.family_of("update.stage") is updates.FAMILY
    assert REGISTRY.family_of("horn.honk") is None
    assert "charge.set_limit" in REGISTRY.names and "horn.honk" not in REGISTRY.names


def test_a_new_family_is_a_registry_entry_not_a_gate_edit():
    from agent.core.registry import Family
    from agent.errors import ParamError

    def ecu_only(name, params):
        if params.get("ecu") not in ("bms", "vcu"):
            raise ParamError("ecu: must be bms or vcu")

    diag = Family("diag", frozenset({"diag.read_dtcs"}), ecu_only)
    with_diag = CommandGate(STORE, VIN, LIMITS, Registry([*REGISTRY.families, diag]))
    message = signed(ADMIN, name="diag.read_dtcs", params={"ecu": "bms"})
    assert isinstance(check(with_diag, message), Accepted)
    outcome = rejected(check(with_diag, signed(ADMIN, name="diag.read_dtcs",
                                               params={"ecu": "abs"})),
                       p.BAD_PARAMS, detail="ecu: must be bms or vcu")
    assert outcome.digest is not None
    rejected(check(CommandGate(STORE, VIN, LIMITS, REGISTRY), message), p.UNKNOWN_COMMAND)


def test_configured_action_names_join_the_actions_family():
    """An action configured beyond the v1 names is known; it takes exactly its placeholders."""
    from agent.core.conditions import Param, parse_condition
    from agent.core.executor import ActionPlan, FramePlan

    frame = FramePlan(0, 0x100, None, {"Level": Param("level")}, {}, 1, 0)
    plan = ActionPlan("horn.honk", "horn", (), (), (parse_condition("M.S == 1", "x"),), 1000,
                      1000, (frame,))
    gate = CommandGate(STORE, VIN, LIMITS,
                       Registry([actions_family({"horn.honk": plan}), STATE_FAMILY]))
    assert isinstance(check(gate, signed(ADMIN, name="horn.honk", params={"level": 3})),
                      Accepted)
    rejected(check(gate, signed(ADMIN, name="horn.honk")), p.BAD_PARAMS,
             detail="needs parameter 'level'")
    rejected(check(gate, signed(ADMIN, name="horn.honk", params={"level": 3, "x": 1})),
             p.BAD_PARAMS, detail="takes no parameter 'x'")
    rejected(check(gate, signed(ADMIN, name="horn.honk", params={"level": [3]})), p.BAD_PARAMS)
    # the v1 names stay with their own parameters, configured or not
    rejected(check(gate, signed(ADMIN, name="charge.set_limit", params={"percent": 10})),
             p.BAD_PARAMS)


# -- the precheck (cheap prefix of steps 1-2) and the admission budgets -------------------------

def test_precheck_refuses_like_check_without_the_signature(gate):
    from agent.core.commands import Screened

    for message in (b"\xd2\x84\x40\xa0", b"\xd8\x12junk", cbor2.dumps(cbor2.CBORTag(17, [])),
                    b"x" * 5000, signed(key=STRANGER)):
        pre, full = gate.precheck(message), check(gate, message)
        assert isinstance(pre, Rejected) and (pre.reason, pre.detail, pre.id) == \
            (full.reason, full.detail, None), (pre, full)
    for message in (b"", b"junk", cbor2.dumps({"a": 1}), cbor2.dumps([1, 2])):  # no tag at all
        pre, full = gate.precheck(message), check(gate, message)
        assert (pre.reason, pre.id, full.reason) == (p.BAD_ENVELOPE, None, p.BAD_ENVELOPE)
    # a forged signature under a trusted kid passes: only the full check can tell
    forged = bytearray(signed())
    forged[-1] ^= 1
    assert isinstance(gate.precheck(bytes(forged)), Screened)
    assert check(gate, bytes(forged)).reason == p.BAD_SIGNATURE


def test_fingerprint_covers_the_signed_parts_not_the_unprotected_header(gate):
    payload = cbor2.dumps(command())
    a = gate.precheck(raw_sign1(OPS, payload, kid_of(OPS.public_key())))
    b = gate.precheck(raw_sign1(OPS, payload, kid_of(OPS.public_key()),
                                unprotected={99: b"\0" * 3000}))
    c = gate.precheck(raw_sign1(OPS, cbor2.dumps(command(id="c-2")), kid_of(OPS.public_key())))
    assert a.fingerprint == b.fingerprint != c.fingerprint
    assert a.kid == kid_of(OPS.public_key())


def _admission(**over):
    import random

    from agent.core.ratelimit import Admission, AdmissionLimits

    return Admission(AdmissionLimits(**over), random.Random(1).random)


def test_admission_answers_garbage_at_the_global_rate_only():
    from agent.core.ratelimit import ANSWER

    a = _admission(reject_rate_per_s=2, reject_burst=3)
    verdicts = [a.screen(None, None, NOW + i) for i in range(100)]  # 100 within 0.1 s
    assert verdicts.count(ANSWER) == 3 and verdicts.count("flood_dropped") == 97
    assert a.screen(None, None, NOW + 600) == "flood_dropped"  # garbage: at most 1/s
    assert a.screen(None, None, NOW + 1100) == ANSWER
    d = _admission()  # the defaults: 20/s for rejections, 1/s (5 saved up) for garbage
    assert [d.screen(None, None, NOW) for _ in range(10)].count(ANSWER) == 5
    assert d.reject.take(NOW)  # garbage did not spend the verified rejections' budget


def test_admission_lets_one_copy_of_a_verified_command_through_per_interval():
    from agent.core.ratelimit import REDELIVER

    a = _admission(redelivery_interval_ms=5000)
    a.verified(b"fp", "c-1", NOW)
    assert [a.screen(b"k", b"fp", NOW + i * 100) for i in range(49)] == \
        ["redelivery_dropped"] * 49
    assert a.screen(b"k", b"fp", NOW + 5000) == REDELIVER
    assert a.screen(b"k", b"fp", NOW + 5001) == "redelivery_dropped"
    a.forged(b"bad")
    assert a.screen(b"k", b"bad", NOW) == "forged_dropped"


def test_each_kid_has_its_own_budget_and_a_resent_message_gets_another_chance():
    from agent.core.ratelimit import VERIFY

    a = _admission(verify_rate_per_s=10, verify_burst=10, verify_sample=0.0)
    spent = [a.screen(b"kid-A", b"forged-%d" % i, NOW) for i in range(1000)]
    assert spent.count(VERIFY) == 10  # kid A's budget, then dropped
    assert a.screen(b"kid-B", b"genuine-B", NOW) == VERIFY  # B's budget is untouched
    assert a.screen(b"kid-A", b"genuine-A", NOW) == "budget_dropped"  # first try: no budget
    assert a.screen(b"kid-A", b"genuine-A", NOW + 1) == VERIFY  # its re-send: the repeat budget
    # a sample of an over-budget kid's messages is verified all the same
    s = _admission(verify_rate_per_s=1, verify_burst=1, verify_sample=0.05)
    verdicts = [s.screen(b"kid", b"f-%d" % i, NOW) for i in range(10_000)]
    assert 300 <= verdicts.count(VERIFY) <= 700


def test_lru_keeps_the_most_recent():
    from agent.core.ratelimit import Lru

    lru = Lru(3)
    for k in "abcd":
        lru.set(k, k.upper())
    assert "a" not in lru and lru.get("d") == "D" and len(lru) == 3
