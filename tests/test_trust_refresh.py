"""The trust store as a TUF target: a real repository served on loopback (rotated root, a key
revoked by a new store version), the real gate and the trust family's handler, real files."""

from __future__ import annotations

import json
import os
import time

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from agent.app.families import handlers as family_handlers
from agent.app.trustservice import TrustHandler
from agent.cloud import repo
from agent.config import config_from_dict
from agent.core.commands import Accepted, CommandGate, GateLimits, Rejected
from agent.core.cose import Signer
from agent.core.registry import Registry
from agent.core.trust import FAMILY, accept_trust_target, check_trust_params
from agent.errors import ParamError, UpdateError

VIN = "WVWZZZ1JZXW000001"
LIMITS = GateLimits(max_skew_ms=30_000, max_lifetime_ms=600_000, max_message_bytes=65536)
ADMIN = Ed25519PrivateKey.generate()  # may refresh the trust store
LEAKED = ec.generate_private_key(ec.SECP256R1())  # a P-256 fleet key that leaks
NEW_OPS = Ed25519PrivateKey.generate()  # its replacement
NAMES = frozenset({"doors.lock", "doors.unlock", "trust.refresh"})


def pem(key) -> str:
    return key.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo).decode()


def store_text(*entries) -> str:
    return "".join(f'[[key]]\nname = "{name}"\npublic_key = """{pem(key)}"""\nallow = {json.dumps(list(allow))}\n'
                   for name, key, allow in entries)


FACTORY = store_text(("admin", ADMIN, ["trust.*", "doors.*"]), ("fleet", LEAKED, ["doors.*"]))
REVOKED = store_text(("admin", ADMIN, ["trust.*", "doors.*"]), ("fleet-2", NEW_OPS, ["doors.*"]))


@pytest.fixture
def world(tmp_path, test_dbc):
    """A repository whose root was rotated after the vehicle's root was shipped, serving on
    127.0.0.1; a vehicle config with the factory trust store."""
    shipped_root = repo.init_repo(tmp_path / "repo")
    vehicle_root = tmp_path / "vehicle-root.json"
    vehicle_root.write_bytes(shipped_root.read_bytes())  # what the vehicle was built with
    assert repo.rotate_root_key(tmp_path / "repo") == 2
    repo.publish(tmp_path / "repo")
    server = repo.serve(tmp_path / "repo")
    (tmp_path / "trust.toml").write_text(FACTORY)
    os.chmod(tmp_path / "trust.toml", 0o644)
    raw = {"vehicle": {"vin": VIN}, "storage": {"dir": str(tmp_path / "state")},
           "bus": [{"name": "a", "interface": "virtual", "channel": "x", "dbc": [str(test_dbc)]}],
           "commands": {"trust_store": str(tmp_path / "trust.toml")},
           "updates": {"trusted_root": str(vehicle_root),
                       "allowed_repositories": [server.url + "/"], "hardware_id": "tcu-hw-3",
                       "installed_version": "1.0.0", "preconditions": ["VCU_Drive.Gear == 0"]}}
    config = config_from_dict(raw, base=tmp_path)
    yield {"config": config, "server": server, "repo": tmp_path / "repo", "tmp": tmp_path}
    server.close()


def publish_store(world, text: str, version: int, **scope) -> None:
    path = world["tmp"] / f"store-{version}-{time.monotonic_ns()}.toml"
    path.write_text(text)
    repo.add_trust_target(world["repo"], path, version, **scope)


def vehicle(world):
    handler = TrustHandler(world["config"], NAMES)
    registry = Registry([FAMILY, _doors()])
    gate = CommandGate(handler.initial_store(), VIN, LIMITS, registry)
    handler.bind_gate(gate)
    return handler, gate


def _doors():
    from agent.core.registry import Family, no_params
    return Family("doors", frozenset({"doors.lock", "doors.unlock"}), no_params)


class Clock:
    def __init__(self):
        self.ms = int(time.time() * 1000)

    def __call__(self):
        self.ms += 10
        return self.ms


NOW = Clock()


def signed(key, name, cid, params=None) -> bytes:
    now = NOW()
    return Signer(key).sign({"v": 1, "id": cid, "vin": VIN, "name": name, "params": params or {},
                             "iat": now, "exp": now + 60_000})


def refresh(handler, gate, world, cid, key=ADMIN, target="trust.toml"):
    msg = signed(key, "trust.refresh", cid, {"repository": world["server"].url, "target": target})
    outcome = gate.check(msg, NOW.ms, lambda c: None)
    assert isinstance(outcome, Accepted), outcome
    out = handler.handle(outcome.command, NOW.ms)
    assert [(s.id, s.status) for s in out] == [(cid, "ACCEPTED")]
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        got = handler.poll(NOW.ms)
        if got:
            return got
        time.sleep(0.02)
    raise AssertionError("the refresh never finished")


def test_revoked_key_accepted_before_the_refresh_and_unknown_after(world):
    handler, gate = vehicle(world)
    assert handler.status() == {"source": str(world["tmp"] / "trust.toml"), "version": 0}
    before = gate.check(signed(LEAKED, "doors.unlock", "c-before"), NOW.ms, lambda c: None)
    assert isinstance(before, Accepted) and before.command.key_name == "fleet"

    publish_store(world, REVOKED, 2)
    old_store = gate.trust
    [done] = refresh(handler, gate, world, "r-1")
    assert (done.status, done.result) == ("SUCCEEDED", {"version": 2, "changed": True, "keys": 2})
    assert gate.trust is not old_store
    # The vehicle shipped with root v1 and followed the rotation to v2 (signed by both keys).
    cached = world["config"].storage.dir / "trust" / "tuf" / "root.json"
    assert json.loads(cached.read_text())["signed"]["version"] == 2
    after = gate.check(signed(LEAKED, "doors.unlock", "c-after"), NOW.ms, lambda c: None)
    assert isinstance(after, Rejected) and after.reason == "UNKNOWN_KEY"
    assert isinstance(gate.check(signed(NEW_OPS, "doors.lock", "c-new"), NOW.ms, lambda c: None),
                      Accepted)
    status = handler.status()
    assert status["source"] == "tuf" and status["version"] == 2 and status["target"] == "trust.toml"

    # The same version again: nothing changes. A restart keeps the refreshed store in force.
    [same] = refresh(handler, gate, world, "r-2")
    assert (same.status, same.result) == ("SUCCEEDED", {"version": 2, "changed": False})
    handler2, gate2 = vehicle(world)
    assert handler2.status()["version"] == 2
    assert gate2.check(signed(LEAKED, "doors.unlock", "c-restart"), NOW.ms,
                       lambda c: None).reason == "UNKNOWN_KEY"


def test_rolled_back_target_is_refused(world):
    handler, gate = vehicle(world)
    publish_store(world, REVOKED, 3)
    assert refresh(handler, gate, world, "r-1")[0].status == "SUCCEEDED"
    # The repository (or whoever holds its targets key) publishes the old store again as v2.
    publish_store(world, FACTORY, 2)
    [done] = refresh(handler, gate, world, "r-2")
    assert (done.status, done.reason) == ("FAILED", "VERIFICATION_FAILED")
    assert "rollback refused" in done.detail
    assert gate.check(signed(LEAKED, "doors.unlock", "c-x"), NOW.ms,
                      lambda c: None).reason == "UNKNOWN_KEY"
    assert handler.status()["version"] == 3


def test_scoping_and_invalid_stores(world):
    handler, gate = vehicle(world)
    publish_store(world, REVOKED, 2, vins=["OTHERVIN0000000001"])
    [done] = refresh(handler, gate, world, "r-vin")
    assert done.status == "FAILED" and "not for this vehicle" in done.detail
    publish_store(world, REVOKED, 3, hardware_ids=["tcu-hw-2"])
    [done] = refresh(handler, gate, world, "r-hw")
    assert done.status == "FAILED" and "not for this hardware" in done.detail
    # A store naming a key file (a downloaded store names no local paths), and a broken one.
    publish_store(world, '[[key]]\nname = "x"\npublic_key = "/etc/passwd"\nallow = ["*"]\n', 4)
    [done] = refresh(handler, gate, world, "r-path")
    assert (done.status, done.reason) == ("FAILED", "VERIFICATION_FAILED") and "inline" in done.detail
    publish_store(world, REVOKED + REVOKED, 5)  # duplicate names
    [done] = refresh(handler, gate, world, "r-dup")
    assert done.status == "FAILED" and "already the name" in done.detail
    # Nothing was installed: the factory store is still in force, the leaked key still works.
    assert handler.status()["version"] == 0
    assert isinstance(gate.check(signed(LEAKED, "doors.lock", "c-y"), NOW.ms, lambda c: None),
                      Accepted)
    publish_store(world, REVOKED, 6, vins=[VIN], hardware_ids=["tcu-hw-3"])
    assert refresh(handler, gate, world, "r-ok")[0].status == "SUCCEEDED"
    assert handler.status()["version"] == 6


def test_unlisted_repository_and_unknown_target(world):
    handler, gate = vehicle(world)
    msg = signed(ADMIN, "trust.refresh", "r-evil", {"repository": "http://127.0.0.2:9/x",
                                                    "target": "trust.toml"})
    outcome = gate.check(msg, NOW.ms, lambda c: None)
    [r] = handler.handle(outcome.command, NOW.ms)
    assert (r.status, r.reason) == ("REJECTED", "BAD_PARAMS")
    [done] = refresh(handler, gate, world, "r-none", target="absent.toml")
    assert (done.status, done.reason) == ("FAILED", "VERIFICATION_FAILED")
    # Not allowed for the fleet key.
    msg = signed(LEAKED, "trust.refresh", "r-fleet", {"repository": world["server"].url,
                                                      "target": "trust.toml"})
    assert gate.check(msg, NOW.ms, lambda c: None).reason == "UNAUTHORIZED"


def test_a_tampered_installed_store_fails_closed(world):
    handler, gate = vehicle(world)
    publish_store(world, REVOKED, 2)
    assert refresh(handler, gate, world, "r-1")[0].status == "SUCCEEDED"
    installed = world["config"].storage.dir / "trust" / "v2.toml"
    installed.write_text(FACTORY)  # someone puts the leaked key back on disk
    handler2, gate2 = vehicle(world)
    assert len(gate2.trust) == 0 and handler2.status()["source"] == "tuf (unusable)"
    assert gate2.check(signed(LEAKED, "doors.unlock", "c-z"), NOW.ms,
                       lambda c: None).reason == "UNKNOWN_KEY"


def test_periodic_refresh(world):
    cfg = world["config"]
    from dataclasses import replace
    from agent.config import TrustRefreshConfig
    world["config"] = replace(cfg, trust=TrustRefreshConfig(repository=world["server"].url,
                                                            target="trust.toml", interval_s=3600))
    handler, gate = vehicle(world)
    publish_store(world, REVOKED, 2)
    assert handler.poll(1_000) == []  # started
    deadline = time.monotonic() + 30
    while handler.status().get("version") != 2 and time.monotonic() < deadline:
        assert handler.poll(1_000) == []  # no command: no status
        time.sleep(0.02)
    assert handler.status()["version"] == 2 and len(gate.trust) == 2
    assert handler.poll(2_000) == [] and "refreshing" not in handler.status()  # not due yet


def test_params_and_target_fields():
    check_trust_params("trust.refresh", {"repository": "https://u.example/fleet", "target": "t"})
    for params in ({}, {"repository": "ftp://x/y", "target": "t"},
                   {"repository": "https://u.example/f", "target": ""},
                   {"repository": "https://u.example/f", "target": "t", "x": 1}):
        with pytest.raises(ParamError):
            check_trust_params("trust.refresh", params)
    assert accept_trust_target("t", {"trust_version": 3}, 2, VIN, "hw") == 3
    assert accept_trust_target("t", {"trust_version": 2}, 2, VIN, "hw") is None
    for custom in (None, {}, {"trust_version": "3"}, {"trust_version": 0},
                   {"trust_version": True}, {"trust_version": 3, "vins": "WVW"},
                   {"trust_version": 1}):
        with pytest.raises(UpdateError):
            accept_trust_target("t", custom, 2, VIN, "hw")


@pytest.mark.mqtt
def test_end_to_end_through_the_agent(tmp_path):
    """The whole agent: a leaked key works, trust.refresh (signed by the admin key, over the
    broker) installs a store without it, the leaked key gets UNKNOWN_KEY; status says which
    store is in force."""
    import subprocess
    import sys

    from agent.adapters.keys import generate_keypair, load_private_key
    from conftest import ROOT
    from support.agentproc import wait_for
    from test_updates_e2e import UpdateRig

    rig = UpdateRig(tmp_path)
    try:
        generate_keypair(rig.keys, stem="leaked", alg="es256")
        cloud_pem = (rig.keys / "cloud.pub").read_text()
        factory = (f'[[key]]\nname = "fleet-backend"\npublic_key = """{cloud_pem}"""\n'
                   'allow = ["update.*", "state.*", "trust.*"]\n'
                   f'[[key]]\nname = "leaked"\npublic_key = "{rig.keys / "leaked.pub"}"\n'
                   'allow = ["state.*"]\n')
        (tmp_path / "trust.toml").write_text(factory)
        store = tmp_path / "v2.toml"
        store.write_text(f'[[key]]\nname = "fleet-backend"\npublic_key = """{cloud_pem}"""\n'
                         'allow = ["update.*", "state.*", "trust.*"]\n')
        repo.add_trust_target(rig.repo_dir, store, 2, vins=[VIN_E2E])
        agent = rig.start_agent()
        leaked = Signer(load_private_key(rig.keys / "leaked.key"))
        cid, _ = rig.cloud.command("state.snapshot", signer=leaked)
        assert rig.cloud.wait_terminal(cid)["status"] == "SUCCEEDED"

        cid, _ = rig.cloud.command("trust.refresh", {"repository": rig.server.url,
                                                     "target": "trust.toml"})
        done = rig.cloud.wait_terminal(cid, timeout=30)
        assert done["status"] == "SUCCEEDED" and done["result"]["version"] == 2, done

        cid, _ = rig.cloud.command("state.snapshot", signer=leaked)
        wait_for(lambda: any(s.get("reason") == "UNKNOWN_KEY" for s in rig.cloud.statuses(None)),
                 what="UNKNOWN_KEY for the revoked key")
        assert rig.cloud.statuses(cid) == []  # never executed, never answered by id
        cid, _ = rig.cloud.command("state.snapshot")
        assert rig.cloud.wait_terminal(cid)["status"] == "SUCCEEDED"
        status = agent.status()
        assert status["trust"]["source"] == "tuf" and status["trust"]["version"] == 2
        from agent.cli.status import render
        line = next(l for l in render(status).splitlines() if l.startswith("trust"))
        assert "version 2" in line and "tuf" in line
    finally:
        rig.close()


VIN_E2E = "DEMO0EV0000000001"


def test_cloud_cli_publishes_a_trust_target_and_rotates_the_root(tmp_path):
    from agent.cloud.main import main

    repo.init_repo(tmp_path / "r")
    store = tmp_path / "trust-v4.toml"
    store.write_text(REVOKED)
    assert main(["repo", "add-trust", str(tmp_path / "r"), str(store), "--trust-version", "4",
                 "--vin", VIN, "--hardware-id", "hw-1"]) == 0
    targets = json.loads((tmp_path / "r" / "metadata" / "targets.json").read_text())
    assert targets["signed"]["targets"]["trust.toml"]["custom"] == {
        "trust_version": 4, "vins": [VIN], "hardware_ids": ["hw-1"]}
    assert main(["repo", "rotate-root", str(tmp_path / "r")]) == 0
    root2 = json.loads((tmp_path / "r" / "metadata" / "2.root.json").read_text())
    assert len(root2["signatures"]) == 2  # the old and the new root key
    bad = tmp_path / "bad.toml"
    bad.write_text('[[key]]\nname = "x"\npublic_key = "k.pub"\nallow = ["*"]\n')
    assert main(["repo", "add-trust", str(tmp_path / "r"), str(bad), "--trust-version", "5"]) == 2


def test_tuf_expiry_is_checked_against_the_time_floor(world):
    """The system clock is behind the floor (a floor two days ahead): metadata that expires
    tomorrow is expired for the vehicle, though the system clock says it is still valid."""
    from agent.adapters.clockstore import mono_ms
    from agent.core.clock import TrustedClock

    store = world["tmp"] / "short.toml"
    store.write_text(REVOKED)
    repo.add_trust_target(world["repo"], store, 2, expires_days=1)
    handler, gate = vehicle(world)
    system = NOW.ms
    NOW.ms = system + 2 * 86_400_000  # the cloud signs with the true time, ahead of ours
    try:
        gate.clock = TrustedClock(NOW.ms, "stored", mono_ms())
        [done] = refresh(handler, gate, world, "r-floor")
    finally:
        NOW.ms = system
    assert (done.status, done.reason) == ("FAILED", "VERIFICATION_FAILED")
    assert "expired" in done.detail
    gate.clock = TrustedClock()  # no floor: the system clock alone, and it is still valid
    assert refresh(handler, gate, world, "r-system")[0].status == "SUCCEEDED"
