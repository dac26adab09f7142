"""Car sharing (PROTOCOL.md §11): rental grants in the command gate, revocations on disk, the
rental family's handler. Every message is really signed (our Signer, cbor2 + cryptography, or
pycose); nothing of ours is mocked."""

from __future__ import annotations

import time

import cbor2
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
)

from agent.adapters.revocations import FILE, RevocationFile
from agent.app.rentalservice import RentalHandler
from agent.cloud.grant import GrantSigner, duration_ms, make_grant
from agent.config import RentalConfig
from agent.core import rental as R
from agent.core.clock import TrustedClock
from agent.core.commands import Accepted, CommandGate, GateLimits, Rejected, TrustedKey, TrustStore
from agent.core.conditions import parse_condition
from agent.core.cose import Signer, kid_of, public_bytes
from agent.core.executor import actions_family
from agent.core.registry import Family, Registry, no_params

VIN = "DEMO0EV0000000001"
HOUR = 3_600_000


def now_ms() -> int:
    return int(time.time() * 1000)


class World:
    """A backend allowed rental.grant, an ops key that is not, a phone, a registry."""

    def __init__(self, phone_alg: str = "eddsa"):
        self.backend = Ed25519PrivateKey.generate()
        self.ops = Ed25519PrivateKey.generate()
        self.phone = (ec.generate_private_key(ec.SECP256R1()) if phone_alg == "es256"
                      else Ed25519PrivateKey.generate())
        self.trust = TrustStore([
            TrustedKey("car-sharing", self.backend.public_key(),
                       ("doors.*", "immobilizer.*", "rental.*", "rental.grant")),
            TrustedKey("ops", self.ops.public_key(), ("doors.*", "charge.*")),
        ])
        actions = Family("actions", frozenset({"doors.lock", "doors.unlock", "immobilizer.off",
                                               "immobilizer.on", "charge.start"}), no_params)
        self.registry = Registry([actions, R.FAMILY])
        self.revocations = R.Revocations()
        self.seen: dict[str, bytes] = {}
        self.gate = CommandGate(self.trust, VIN, GateLimits(), self.registry,
                                revoked=self.revocations.revoked)

    def grant(self, *, signer=None, vin=VIN, rental="R1", allow=("doors.*", "immobilizer.off",
              "rental.end"), nbf=None, exp=None, key=None) -> bytes:
        nbf = now_ms() - 1000 if nbf is None else nbf
        exp = nbf + 2 * HOUR if exp is None else exp
        return make_grant(Signer(signer or self.backend), vin, rental,
                          (key or self.phone).public_key(), list(allow), nbf, exp)

    def command(self, name, grant=None, *, key=None, cid=None, params=None, vin=VIN):
        t = now_ms()
        payload = {"v": 1, "id": cid or f"c-{t}-{name}", "vin": vin, "name": name,
                   "params": params or {}, "iat": t, "exp": t + 60_000}
        return GrantSigner(key or self.phone, grant if grant is not None else self.grant()
                           ).sign(payload)

    def check(self, message):
        outcome = self.gate.check(message, now_ms(), self.seen.get)
        if isinstance(outcome, Accepted):
            self.seen[outcome.command.id] = outcome.command.digest
        return outcome


@pytest.fixture(params=["eddsa", "es256"])
def world(request):
    return World(request.param)


def rejected(outcome, reason):
    assert isinstance(outcome, Rejected), outcome
    assert outcome.reason == reason, outcome
    return outcome


# -- accepted -----------------------------------------------------------------------------

def test_a_phone_command_under_a_grant_is_accepted(world):
    out = world.check(world.command("doors.unlock"))
    assert isinstance(out, Accepted), out
    assert out.command.rental == "R1"
    assert out.command.kid == kid_of(world.phone.public_key())
    assert out.command.key_name == "rental R1 (granted by car-sharing)"


def test_a_grant_is_verified_once_then_each_command_costs_one_signature(world):
    grant = world.grant()
    for i in range(5):
        assert isinstance(world.check(world.command("doors.unlock", grant, cid=f"c{i}")), Accepted)
    assert world.gate.grants.verified == 1


def test_a_grant_bearing_command_does_not_raise_the_clock_floor():
    w = World()
    clock = TrustedClock()
    w.gate = CommandGate(w.trust, VIN, GateLimits(), w.registry, clock=clock,
                         revoked=w.revocations.revoked)
    assert isinstance(w.gate.check(w.command("doors.unlock"), now_ms(), w.seen.get, 1), Accepted)
    assert clock.floor_ms == 0


# -- refused, in §11's order ----------------------------------------------------------------

def test_a_grant_from_a_key_without_rental_grant_is_unknown_key(world):
    out = rejected(world.check(world.command("doors.unlock", world.grant(signer=world.ops))),
                   "UNKNOWN_KEY")
    assert out.id is None and "'ops' may not issue rental grants" in out.detail


def test_a_grant_from_an_unknown_key_is_unknown_key(world):
    stranger = Ed25519PrivateKey.generate()
    out = rejected(world.check(world.command("doors.unlock", world.grant(signer=stranger))),
                   "UNKNOWN_KEY")
    assert kid_of(stranger.public_key()).hex() in out.detail


def test_without_a_grant_the_phone_is_an_unknown_key(world):
    t = now_ms()
    plain = Signer(world.phone).sign({"v": 1, "id": "x", "vin": VIN, "name": "doors.unlock",
                                      "params": {}, "iat": t, "exp": t + 60_000})
    rejected(world.check(plain), "UNKNOWN_KEY")


@pytest.mark.parametrize("when", ["expired", "not yet valid"])
def test_a_grant_outside_its_window_is_expired(world, when):
    t = now_ms()
    grant = (world.grant(nbf=t - 3 * HOUR, exp=t - HOUR) if when == "expired"
             else world.grant(nbf=t + HOUR, exp=t + 3 * HOUR))
    out = rejected(world.check(world.command("doors.unlock", grant)), "EXPIRED")
    assert ("ended" if when == "expired" else "starts in") in out.detail


def test_a_grant_longer_than_max_grant_ms_is_expired(world):
    t = now_ms()
    rejected(world.check(world.command("doors.unlock", world.grant(nbf=t, exp=t + 8 * 24 * HOUR))),
             "EXPIRED")


def test_a_grant_for_another_vehicle_is_wrong_vehicle(world):
    out = rejected(world.check(world.command("doors.unlock", world.grant(vin="OTHER0VIN"))),
                   "WRONG_VEHICLE")
    assert "OTHER0VIN" in out.detail


def test_a_command_outside_the_grants_allow_is_unauthorized(world):
    out = rejected(world.check(world.command("doors.unlock", world.grant(allow=["doors.lock"]))),
                   "UNAUTHORIZED")
    assert out.id is not None and "rental R1 does not allow 'doors.unlock'" in out.detail


def test_a_grant_never_widens_what_its_signer_may_do(world):
    # The grant names charge.start; its signer's allow does not.
    out = rejected(world.check(world.command("charge.start", world.grant(allow=["*"]))),
                   "UNAUTHORIZED")
    assert "issuer 'car-sharing' may not issue 'charge.start'" in out.detail


def test_a_command_signed_by_another_key_is_bad_signature(world):
    other = Ed25519PrivateKey.generate()
    out = rejected(world.check(world.command("doors.unlock", key=other)), "BAD_SIGNATURE")
    assert out.id is None and "not by the rental key" in out.detail


def test_a_command_signed_by_another_key_under_the_phones_kid_is_bad_signature(world):
    """The kid is the grant's, the signature is not: verified with the grant's key."""
    other = (ec.generate_private_key(ec.SECP256R1()) if isinstance(world.phone, ec.EllipticCurvePrivateKey)
             else Ed25519PrivateKey.generate())
    signer = GrantSigner(other, world.grant())
    signer.protected = cbor2.dumps({**cbor2.loads(signer.protected),
                                    4: kid_of(world.phone.public_key())}, canonical=True)
    t = now_ms()
    message = signer.sign({"v": 1, "id": "x", "vin": VIN, "name": "doors.unlock", "params": {},
                           "iat": t, "exp": t + 60_000})
    rejected(world.check(message), "BAD_SIGNATURE")


def test_a_tampered_grant_is_bad_signature(world):
    grant = bytearray(world.grant())
    grant[-1] ^= 1
    rejected(world.check(world.command("doors.unlock", bytes(grant))), "BAD_SIGNATURE")


def test_an_oversized_grant_is_bad_envelope(world):
    out = rejected(world.check(world.command("doors.unlock", world.grant(allow=["x" * 80] * 60))),
                   "BAD_ENVELOPE")
    assert "4096-byte limit" in out.detail


def test_a_revoked_rental_is_unauthorized(world):
    grant = world.grant()
    assert isinstance(world.check(world.command("doors.unlock", grant, cid="a")), Accepted)
    world.revocations.add("R1", now_ms() + HOUR)
    out = rejected(world.check(world.command("doors.unlock", grant, cid="b")), "UNAUTHORIZED")
    assert "rental R1 has ended" in out.detail


def test_a_grant_replayed_with_a_different_command_keeps_the_id_and_replay_rules(world):
    grant = world.grant()
    assert isinstance(world.check(world.command("doors.unlock", grant, cid="same")), Accepted)
    rejected(world.check(world.command("doors.lock", grant, cid="same")), "REPLAYED")
    # A fresh id with the same grant is a new command.
    assert isinstance(world.check(world.command("doors.lock", grant, cid="new")), Accepted)


def test_a_driver_may_only_end_its_own_rental(world):
    out = rejected(world.check(world.command("rental.end", params={"rental": "R2"})),
                   "UNAUTHORIZED")
    assert "its own rental (R1)" in out.detail
    out = world.check(world.command("rental.end", params={"rental": "R1"}))
    assert isinstance(out, Accepted) and out.command.rental == "R1"


def test_without_a_rental_section_grants_are_refused():
    w = World()
    w.gate = CommandGate(w.trust, VIN, GateLimits(), w.registry)  # no revocation memory
    out = rejected(w.check(w.command("doors.unlock")), "UNKNOWN_KEY")
    assert "no [rental] configured" in out.detail


def test_a_backend_command_still_goes_the_ordinary_way(world):
    t = now_ms()
    msg = Signer(world.backend).sign({"v": 1, "id": "b1", "vin": VIN, "name": "rental.revoke",
                                      "params": {"rental": "R1"}, "iat": t, "exp": t + 60_000})
    out = world.check(msg)
    assert isinstance(out, Accepted) and out.command.rental is None


def test_a_grant_label_that_is_not_a_bstr_is_bad_envelope(world):
    signer = GrantSigner(world.phone, b"")
    signer.protected = cbor2.dumps({**cbor2.loads(signer.protected), "grant": "text"},
                                   canonical=True)
    t = now_ms()
    rejected(world.check(signer.sign({"v": 1, "id": "x", "vin": VIN, "name": "doors.unlock",
                                      "params": {}, "iat": t, "exp": t + 60_000})), "BAD_ENVELOPE")


# -- third party: pycose builds the grant and the command ---------------------------------

def test_pycose_grant_and_command_are_accepted():
    from pycose.algorithms import EdDSA, Es256
    from pycose.headers import KID, Algorithm, ContentType
    from pycose.keys import EC2Key, OKPKey
    from pycose.keys.curves import P256, Ed25519
    from pycose.messages import Sign1Message

    w = World("es256")
    backend_x = w.backend.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    backend_d = w.backend.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
    t = now_ms()
    phone_point = public_bytes(w.phone.public_key())
    grant = Sign1Message(phdr={Algorithm: EdDSA, KID: kid_of(w.backend.public_key()),
                               ContentType: "application/cbor"},
                         payload=cbor2.dumps({"v": 1, "vin": VIN, "rental": "R9", "key": phone_point,
                                              "allow": ["doors.*"], "nbf": t - 1000,
                                              "exp": t + HOUR}))
    grant.key = OKPKey(crv=Ed25519, x=backend_x, d=backend_d)
    grant_bytes = grant.encode()
    numbers = w.phone.private_numbers()
    cmd = Sign1Message(phdr={Algorithm: Es256, KID: kid_of(w.phone.public_key()),
                             ContentType: "application/cbor", "grant": grant_bytes},
                       payload=cbor2.dumps({"v": 1, "id": "py-1", "vin": VIN, "name": "doors.unlock",
                                            "params": {}, "iat": t, "exp": t + 60_000}))
    cmd.key = EC2Key(crv=P256, x=phone_point[1:33], y=phone_point[33:],
                     d=numbers.private_value.to_bytes(32, "big"))
    out = w.check(cmd.encode())
    assert isinstance(out, Accepted), out
    assert out.command.rental == "R9"


# -- revocations on disk ------------------------------------------------------------------

def test_revocations_survive_a_restart_and_are_kept_until_their_end(tmp_path):
    t = now_ms()
    f = RevocationFile(tmp_path, t)
    f.revoke("R1", t + HOUR, t)
    assert (tmp_path / FILE).exists()
    again = RevocationFile(tmp_path, t + 1000)
    assert again.revoked("R1", t) and not again.revoked("R2", t)
    later = RevocationFile(tmp_path, t + 2 * HOUR)  # past its end: purged, file rewritten
    assert not later.revoked("R1", t)
    assert R.Revocations.from_bytes((tmp_path / FILE).read_bytes()).until("R1") is None


def test_an_unreadable_revocation_file_refuses_every_grant_that_began_before(tmp_path):
    t = now_ms()
    (tmp_path / FILE).write_bytes(b"{not json")
    f = RevocationFile(tmp_path, t)
    assert f.revoked("ANY", t - 1)  # might have been revoked before the loss
    assert not f.revoked("ANY", t + 1)  # starts after it
    assert (tmp_path / (FILE + ".corrupt")).exists()
    assert RevocationFile(tmp_path, t + 5).revoked("ANY", t - 1)  # the floor is durable


# -- conditions with labels, and the handler -----------------------------------------------

def test_a_condition_label_is_what_a_failure_shows():
    c = parse_condition("BCM_Status.DriverDoorOpen == 0 | driver door open", "x")
    assert c.label == "driver door open" and c.signal == "BCM_Status.DriverDoorOpen"
    ok, why = c.check(lambda s: (1, 1000), 1000, 2000)
    assert not ok and why.startswith("driver door open (")
    assert parse_condition('Body.State == "a | b"', "x").literal == "a | b"  # inside quotes


class Signals(dict):
    def lookup(self, name):
        return (self[name], now_ms()) if name in self else None


def end_cmd(rental="R1", cid="end-1", name="rental.end"):
    from agent.core.commands import Command
    t = now_ms()
    return Command(id=cid, vin=VIN, name=name, params={"rental": rental}, iat=t, exp=t + 60_000,
                   kid=b"k" * 8, key_name="test", digest=b"d" * 32, rental=rental)


def test_rental_end_refuses_naming_the_failing_condition_then_ends_with_the_report(tmp_path):
    cfg = RentalConfig(end_conditions=('BCM_Status.DriverDoorOpen == 0 | driver door open',
                                       'BCM_Status.DoorsLocked == "LOCKED" | doors not locked'),
                       report={"odometer": "VCU_Status.Odometer", "soc": "BMS_Status.SOC"})
    sig = Signals({"BCM_Status.DriverDoorOpen": 1, "BCM_Status.DoorsLocked": "LOCKED",
                   "VCU_Status.Odometer": 12345.6, "BMS_Status.SOC": 61.5})
    h = RentalHandler(cfg, tmp_path, now_ms(), sig.lookup)
    [s] = h.handle(end_cmd(), now_ms())
    assert (s.status, s.reason) == ("REJECTED", "PRECONDITION_FAILED")
    assert s.detail.startswith("driver door open")
    assert not h.revoked("R1", 0)
    sig["BCM_Status.DriverDoorOpen"] = 0
    [s] = h.handle(end_cmd(cid="end-2"), now_ms())
    assert s.status == "SUCCEEDED"
    assert s.result["rental"] == "R1" and s.result["odometer"] == 12345.6
    assert s.result["soc"] == 61.5
    assert RentalHandler(cfg, tmp_path, now_ms(), sig.lookup).revoked("R1", 0)  # durable


def test_rental_revoke_is_durable_and_without_rental_config_unknown(tmp_path):
    h = RentalHandler(RentalConfig(), tmp_path, now_ms(), Signals().lookup)
    [s] = h.handle(end_cmd("R5", name="rental.revoke"), now_ms())
    assert s.status == "SUCCEEDED" and RentalHandler(RentalConfig(), tmp_path, now_ms(),
                                                     Signals().lookup).revoked("R5", 0)
    [s] = RentalHandler(None, tmp_path, now_ms(), Signals().lookup).handle(end_cmd(), now_ms())
    assert s.reason == "UNKNOWN_COMMAND"


def test_rental_params():
    from agent.errors import ParamError
    R.check_params("rental.end", {"rental": "R1"})
    for bad in ({}, {"rental": ""}, {"rental": 5}, {"rental": "R1", "x": 1}):
        with pytest.raises(ParamError):
            R.check_params("rental.end", bad)


def test_durations():
    assert duration_ms("2h") == 2 * HOUR and duration_ms("90") == 90_000
    assert duration_ms("15m") == 900_000
    from agent.errors import AgentError
    with pytest.raises(AgentError):
        duration_ms("soon")


def test_actions_family_is_unchanged_by_rentals():
    assert "rental.end" not in actions_family().commands


# -- the flood screen (precheck) ----------------------------------------------------------

def test_precheck_screens_a_grant_bearing_command_under_its_signers_grant_budget(world):
    from agent.core.commands import Screened
    out = world.gate.precheck(world.command("doors.unlock"))
    assert isinstance(out, Screened), out
    assert out.kid == b"grant:" + kid_of(world.backend.public_key())  # not the phone's kid


def test_precheck_refuses_what_check_refuses_the_same_way(world):
    stranger = Ed25519PrivateKey.generate()
    unknown = world.command("doors.unlock", world.grant(signer=stranger))
    for message in (unknown,):
        pre, full = world.gate.precheck(message), world.check(message)
        assert isinstance(pre, Rejected) and (pre.reason, pre.detail) == (full.reason, full.detail)
    w = World()
    w.gate = CommandGate(w.trust, VIN, GateLimits(), w.registry)  # no [rental]
    message = w.command("doors.unlock")
    pre, full = w.gate.precheck(message), w.check(message)
    assert (pre.reason, pre.detail) == (full.reason, full.detail) == (
        "UNKNOWN_KEY", "this vehicle takes no rental keys (no [rental] configured)")


def test_precheck_refuses_a_grant_that_cannot_be_one(world):
    signer = GrantSigner(world.phone, b"\x01\x02")
    t = now_ms()
    out = world.gate.precheck(signer.sign({"v": 1, "id": "x", "vin": VIN, "name": "doors.unlock",
                                           "params": {}, "iat": t, "exp": t + 60_000}))
    assert isinstance(out, Rejected) and out.reason == "BAD_ENVELOPE"


def test_rental_config_errors_name_the_key(tmp_path):
    from agent.app.assemble import bus_plans, telemetry_core
    from agent.app.families import handlers
    from agent.config import load_config
    from agent.errors import ConfigError
    from conftest import ROOT

    def build(*overrides):
        cfg = load_config(ROOT / "configs" / "demo.toml",
                          [f"storage.dir={str(tmp_path)!r}", *overrides])
        plans = bus_plans(cfg)
        return handlers(cfg, plans, telemetry_core(plans, cfg.telemetry), [], dict,
                        lambda values, t: None, None, lambda: (True, ""))

    assert any(h.family.name == "rental" for h in build())
    with pytest.raises(ConfigError, match="rental.immobilizer_on: 'immo.on' is not a configured"):
        build("rental.immobilizer_on='immo.on'")
    with pytest.raises(ConfigError, match=r"rental.end_conditions.0: .* is not a condition like `Message.Signal"):
        build("rental.end_conditions=['== 1 | not parked']")
    with pytest.raises(ConfigError, match=r"rental.end_conditions.0.*no signal 'parked'"):
        build("rental.end_conditions=['parked | not parked']")
    with pytest.raises(ConfigError, match="rental: max_grant_ms and stale_ms must be > 0"):
        build("rental.max_grant_ms=0")
