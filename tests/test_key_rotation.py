"""`tcu-agent keys rotate`: the next key, the switch at start, and the proof in every status
record that a cloud which only knows the old key can follow (agent/cloud/keychain.py)."""

from __future__ import annotations

import subprocess
import sys

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from agent.adapters.keys import generate_keypair, load_public_key, next_key_paths
from agent.app.publisher import Publisher
from agent.cloud.keychain import follow_rotation
from agent.config import config_from_dict
from agent.core.cose import Signer, kid_of, verify
from conftest import ROOT
from support.agentproc import VIN, AgentProcess, SlcanFeeder, Verifier, wait_for
from support.mosquitto import Consumer, Mosquitto


def config_for(tmp_path, test_dbc):
    raw = {"vehicle": {"vin": VIN}, "storage": {"dir": str(tmp_path / "state")},
           "bus": [{"name": "a", "interface": "virtual", "channel": "x", "dbc": [str(test_dbc)]}],
           "signing": {"key_file": str(tmp_path / "keys" / "vehicle.key")},
           "mqtt": {"host": "127.0.0.1", "port": 1}}
    toml = tmp_path / "agent.toml"
    toml.write_text(f'[vehicle]\nvin = "{VIN}"\n[storage]\ndir = "{tmp_path / "state"}"\n'
                    f'[[bus]]\nname = "a"\ninterface = "virtual"\nchannel = "x"\n'
                    f'dbc = ["{test_dbc}"]\n[signing]\nkey_file = "{tmp_path / "keys" / "vehicle.key"}"\n'
                    '[mqtt]\nhost = "127.0.0.1"\nport = 1\n')
    return config_from_dict(raw, base=tmp_path), toml


def rotate(toml, *extra) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "agent", "keys", "rotate", "-c", str(toml), *extra],
                          capture_output=True, text=True, cwd=ROOT, timeout=60)


def test_rotation_switches_at_start_and_is_proven_by_the_old_key(tmp_path, test_dbc):
    _, old_pub_path, old_kid = generate_keypair(tmp_path / "keys")
    old_pub = load_public_key(str(old_pub_path))
    config, toml = config_for(tmp_path, test_dbc)

    done = rotate(toml, "--alg", "es256")
    assert done.returncode == 0, done.stderr
    new_kid = done.stdout.strip()
    assert new_kid != old_kid and next_key_paths(config.signing.key_file)[0].exists()
    again = rotate(toml)
    assert again.returncode == 2 and "already exists" in again.stderr

    pub = Publisher(config)
    try:
        assert pub.signer.kid.hex() == new_kid and pub.signer.alg == -7
        assert not next_key_paths(config.signing.key_file)[0].exists()
        assert kid_of(load_public_key(str(old_pub_path))).hex() == new_kid  # vehicle.pub too
        record = pub._status_record(True)
        assert record["key"]["kid"].hex() == new_kid and record["key"]["prev"].hex() == old_kid
        message = pub.signer.sign(record)
        # A cloud that knows only the old key follows the rotation ...
        followed = follow_rotation(message, {bytes.fromhex(old_kid): old_pub}, VIN)
        assert followed is not None and followed[0].hex() == new_kid
        assert isinstance(followed[1], ec.EllipticCurvePublicKey)
        # ... and nobody else can make it follow one: a proof by a stranger, another VIN.
        stranger = Signer(ec.generate_private_key(ec.SECP256R1()))
        assert follow_rotation(message, {stranger.kid: stranger.public_key}, VIN) is None
        assert follow_rotation(message, {bytes.fromhex(old_kid): old_pub}, "OTHER") is None
        forged = dict(record, key=dict(record["key"], proof=stranger.sign(
            verify(record["key"]["proof"], {bytes.fromhex(old_kid): old_pub}).payload)))
        assert follow_rotation(pub.signer.sign(forged), {bytes.fromhex(old_kid): old_pub},
                               VIN) is None
        assert pub.status()["key"] == {"kid": new_kid, "alg": -7, "prev": old_kid}
    finally:
        pub.outbox.close()

    # The next start keeps announcing the same rotation; no second switch.
    pub2 = Publisher(config)
    try:
        assert pub2.signer.kid.hex() == new_kid
        assert pub2._status_record(False)["key"]["prev"].hex() == old_kid
    finally:
        pub2.outbox.close()


def test_rotate_needs_a_key_file(tmp_path, test_dbc):
    config, toml = config_for(tmp_path, test_dbc)
    generate_keypair(tmp_path / "keys")
    toml.write_text(toml.read_text().replace(
        f'key_file = "{tmp_path / "keys" / "vehicle.key"}"',
        'pkcs11 = { module = "/nonexistent.so", token = "t", key_label = "k", pin_file = "/p" }'))
    done = rotate(toml)
    assert done.returncode == 2 and "tcu-agent: error:" in done.stderr


@pytest.mark.mqtt
def test_the_cloud_follows_a_rotation_end_to_end(tmp_path, test_dbc):
    feeder = SlcanFeeder(tmp_path, test_dbc).start()
    try:
        with Mosquitto() as broker, Consumer(broker.host, broker.port, "vehicles/#") as c:
            agent = AgentProcess(tmp_path, test_dbc, feeder.link,
                                 {"host": broker.host, "port": broker.port})
            old = agent.public_key
            agent.start()
            try:
                v = Verifier(old)
                wait_for(lambda: v.check(c.messages).get("telemetry"), what="old-key telemetry")
                assert agent.terminate() == 0
            finally:
                agent.close()
            done = agent.cli("keys", "rotate")
            assert done.returncode == 0, done.stderr
            seen = len(c.messages)
            agent.start()
            try:
                keys = {kid_of(old): old}

                def followed():
                    for m in c.messages[seen:]:
                        if m.topic.endswith("/status"):
                            got = follow_rotation(m.payload, keys, VIN)
                            if got:
                                return got
                    return None
                new_kid, new_key = wait_for(followed, what="a status record with the rotation")
                assert new_kid.hex() == done.stdout.strip()
                keys[new_kid] = new_key
                wait_for(lambda: any(m.topic.endswith("/telemetry") for m in c.messages[seen:]),
                         what="new-key telemetry")
                for m in c.messages[seen:]:
                    verify(m.payload, keys)  # everything after the switch verifies
                    assert m.topic.endswith("/status") or \
                        verify(m.payload, {new_kid: new_key}).kid == new_kid
                status = agent.cli("status")
                assert f"kid {new_kid.hex()} (EdDSA), rotated from {kid_of(old).hex()}" in status.stdout
                assert agent.terminate() == 0
            finally:
                agent.close()
    finally:
        feeder.close()
