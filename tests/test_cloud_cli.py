"""`tcu-cloud`: option errors, key generation, rejections without an id, and TLS."""

from __future__ import annotations

import json
import stat
import subprocess
import sys
import time
import uuid

import pytest

from agent.adapters.keys import generate_keypair
from agent.cloud.main import main
from agent.config import load_config
from agent.app.runtime import Agent
from conftest import ROOT
from support.certs import generate_pki
from support.mosquitto import Mosquitto
from test_commands_e2e import VIN, rig, wait_ready  # noqa: F401  (rig is a fixture)


def tool(*args, timeout=60):
    return subprocess.run([sys.executable, "-m", "agent.cloud.main", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def run_main(argv, capsys) -> tuple[int, str, str]:
    """main() in-process: the exit status (argparse exits, main returns), stdout, stderr."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def keys(tmp_path):
    generate_keypair(tmp_path, stem="cloud")
    return tmp_path


def command_args(keys, *extra):
    return ["command", "--broker", "127.0.0.1:1", "--vin", VIN, "--key", keys / "cloud.key",
            "--name", "charge.start", *extra]


@pytest.mark.parametrize("extra, message", [
    (["--tls-ca", "/nonexistent/ca.pem"], "--tls-ca /nonexistent/ca.pem: no such file"),
    (["--tls-ca", "{keys}/cloud.pub"], "TLS: cannot use --tls-ca"),  # a file, not a CA
    (["--tls-ca", "{keys}/cloud.pub", "--tls-cert", "{keys}/cloud.pub"],
     "--tls-cert and --tls-key go together"),
    (["--tls-ca", "{keys}/cloud.pub", "--tls-key", "{keys}/cloud.key"],
     "--tls-cert and --tls-key go together"),
    (["--tls-cert", "{keys}/cloud.pub", "--tls-key", "{keys}/cloud.key"],
     "--tls-cert needs --tls-ca"),  # would have connected in plaintext
    (["--ttl", "-5"], "argument --ttl: -5: must be > 0"),
    (["--ttl", "0"], "argument --ttl: 0: must be > 0"),
    (["--ttl", "1e9"], "must be > 0 and <= 86400 s"),
    (["--ttl", "soon"], "argument --ttl: 'soon' is not a number of seconds"),
    (["--timeout", "-1"], "argument --timeout: -1: must be > 0"),
])
def test_option_errors_are_one_line_and_exit_2(keys, capsys, extra, message):
    argv = command_args(keys, *[a.format(keys=keys) for a in extra])
    code, out, err = run_main(argv, capsys)
    assert code == 2, (out, err)
    assert message in err and "Traceback" not in err and "usage:" not in err, err
    assert err.splitlines()[0].startswith("tcu-cloud"), err
    assert len(err.splitlines()) <= 2, err  # the error, and at most a pointer to --help


def test_missing_key_suggests_tcu_cloud_keys_generate(tmp_path, capsys):
    code, _, err = run_main(["command", "--broker", "127.0.0.1:1", "--vin", VIN, "--key",
                             tmp_path / "fleet.key", "--name", "charge.start"], capsys)
    assert code == 2
    assert f"`tcu-cloud keys generate --dir {tmp_path} --stem fleet`" in err, err
    assert "tcu-agent" not in err


def test_keys_generate(tmp_path, capsys):
    d = tmp_path / "cloud-keys"
    code, out, err = run_main(["keys", "generate", "--dir", d], capsys)
    assert code == 0, err
    key, pub = d / "cloud.key", d / "cloud.pub"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert stat.S_IMODE(pub.stat().st_mode) == 0o644
    assert stat.S_IMODE(d.stat().st_mode) == 0o700
    assert key.read_text().startswith("-----BEGIN PRIVATE KEY-----")
    assert pub.read_text().startswith("-----BEGIN PUBLIC KEY-----")
    kid = out.strip()
    from agent.adapters.keys import load_public_key
    from agent.core.cose import kid_of
    assert kid == kid_of(load_public_key(pub)).hex()
    assert "trust store" in err

    before = key.read_bytes(), pub.read_bytes()
    code, _, err = run_main(["keys", "generate", "--dir", d], capsys)
    assert code == 2 and "refusing to overwrite" in err and "Traceback" not in err
    assert (key.read_bytes(), pub.read_bytes()) == before  # untouched
    code, out, _ = run_main(["keys", "generate", "--dir", d, "--force"], capsys)
    assert code == 0 and out.strip() != kid and key.read_bytes() != before[0]

    code, out, _ = run_main(["keys", "generate", "--dir", d, "--stem", "fleet"], capsys)
    assert code == 0 and (d / "fleet.key").is_file() and (d / "fleet.pub").is_file()


@pytest.mark.mqtt
def test_rejection_without_id_is_reported(rig):  # noqa: F811
    """A key the vehicle does not trust: the answer is UNKNOWN_KEY with id null."""
    t = time.monotonic()
    run = tool("command", "--broker", f"{rig.broker.host}:{rig.broker.port}", "--vin", VIN,
               "--key", str(rig.keys / "rogue.key"), "--name", "charge.start",
               "--pub", str(rig.keys / "vehicle.pub"), timeout=30)
    took = time.monotonic() - t
    assert run.returncode == 1, run.stdout + run.stderr
    assert took < 8, f"took {took:.1f} s: waited for the timeout"
    [line] = [json.loads(x) for x in run.stdout.splitlines()]
    assert (line["id"], line["status"], line["reason"]) == (None, "REJECTED", "UNKNOWN_KEY")
    assert line["verified"] is True and "no id" in line["note"]
    assert "UNKNOWN_KEY" in run.stderr and "trust store" in run.stderr
    assert rig.watch.requests_since(t) == []


@pytest.mark.mqtt
def test_command_over_mutual_tls(tmp_path):
    pki = generate_pki(tmp_path / "pki")
    keys = tmp_path / "keys"
    generate_keypair(keys, stem="vehicle")
    generate_keypair(keys, stem="cloud")
    trust = tmp_path / "trust.toml"
    trust.write_text(f'[[key]]\nname = "fleet"\npublic_key = "{keys / "cloud.pub"}"\n'
                     'allow = ["state.*"]\n')
    with Mosquitto(cafile=pki.ca, certfile=pki.server_cert, keyfile=pki.server_key,
                   require_certificate=True) as broker:
        agent = Agent(load_config(ROOT / "configs" / "demo.toml", [
            f"bus.0.channel='tls-{uuid.uuid4().hex}'", f"storage.dir='{tmp_path / 'state'}'",
            f"signing.key_file='{keys / 'vehicle.key'}'", f"mqtt.port={broker.port}",
            f"mqtt.tls.ca='{pki.ca}'", f"mqtt.tls.cert='{pki.client_cert}'",
            f"mqtt.tls.key='{pki.client_key}'", f"commands.trust_store='{trust}'"]))
        agent.start()
        try:
            wait_ready(agent)
            assert agent.publisher.uplink.status()["tls"]
            base = ["--broker", f"{broker.host}:{broker.port}", "--vin", VIN, "--tls-ca",
                    str(pki.ca), "--tls-cert", str(pki.client_cert), "--tls-key",
                    str(pki.client_key)]
            ok = tool("command", *base, "--key", str(keys / "cloud.key"), "--name",
                      "state.snapshot", "--pub", str(keys / "vehicle.pub"))
            assert ok.returncode == 0, ok.stdout + ok.stderr
            [final] = [json.loads(x) for x in ok.stdout.splitlines()]
            assert final["status"] == "SUCCEEDED" and final["verified"]
            # an impostor CA: the broker's certificate does not verify, one line, exit 2
            rogue = tool("command", "--broker", f"{broker.host}:{broker.port}", "--vin", VIN,
                         "--tls-ca", str(pki.rogue_ca), "--key", str(keys / "cloud.key"),
                         "--name", "state.snapshot")
            assert rogue.returncode == 2 and "Traceback" not in rogue.stderr, rogue.stderr
            assert "certificate verify failed" in rogue.stderr, rogue.stderr
        finally:
            agent.stop()


# -- the agent's protocol choice (MQTT 5, 3.1.1 when the broker refuses or drops 5) ----------

def listen(port: int, keys, *extra):
    return tool("listen", "--broker", f"127.0.0.1:{port}", "--vin", VIN, "--pub",
                str(keys / "cloud.pub"), "--duration", "1", *extra)


@pytest.mark.mqtt
@pytest.mark.e2e
@pytest.mark.parametrize("refusal", ["connack", "close"])
def test_cloud_falls_back_to_mqtt311_like_the_agent(keys, refusal):
    from test_uplink import MqttProxy

    with Mosquitto() as broker:
        proxy = MqttProxy(broker.port, refuse_v5=refusal)
        try:
            run = listen(proxy.port, keys)
            assert run.returncode == 0, run.stderr
            line = f"broker 127.0.0.1:{proxy.port} works with MQTT 3.1.1; using it from now on"
            assert f"tcu-cloud: {line}\n" in run.stderr
            assert proxy.levels == [5, 4]
            forced = listen(proxy.port, keys, "--mqtt", "5")  # no fallback: one line, exit 2
            assert forced.returncode == 2 and "Traceback" not in forced.stderr
            assert forced.stderr.startswith("tcu-cloud: error: ")
            assert len(forced.stderr.splitlines()) == 1, forced.stderr
            assert proxy.levels == [5, 4, 5]
            direct = listen(proxy.port, keys, "--mqtt", "3.1.1")
            assert direct.returncode == 0 and "works with" not in direct.stderr
            assert proxy.levels == [5, 4, 5, 4]
        finally:
            proxy.close()


@pytest.mark.e2e
def test_cloud_falls_back_to_mqtt311_on_the_amqtt_broker(keys):
    """amqtt speaks MQTT 3.1.1 only."""
    from agent.cloud.broker import EmbeddedBroker

    broker = EmbeddedBroker().start()
    try:
        run = listen(broker.port, keys)
    finally:
        broker.stop()
    assert run.returncode == 0, run.stderr
    assert (f"tcu-cloud: 127.0.0.1:{broker.port} refused the connection: Unsupported protocol "
            "version (MQTT 5); trying MQTT 3.1.1\n") in run.stderr
    assert (f"tcu-cloud: broker 127.0.0.1:{broker.port} works with MQTT 3.1.1; using it from "
            "now on\n") in run.stderr


def test_command_to_a_vin_nothing_answers_says_no_status_was_seen(keys):
    from support.mosquitto import publish
    with Mosquitto() as broker:
        base = ["command", "--broker", f"127.0.0.1:{broker.port}", "--key",
                str(keys / "cloud.key"), "--name", "charge.start", "--timeout", "1.5"]
        proc = tool(*base, "--vin", "NOSUCHVIN00000000")
        assert proc.returncode == 1, proc.stderr
        assert proc.stderr == ("tcu-cloud: no vehicle status was ever seen on "
                               "vehicles/NOSUCHVIN00000000/status: no vehicle with this VIN has "
                               "connected to this broker (sending anyway)\n")
        assert json.loads(proc.stdout.splitlines()[-1])["error"] == (
            "no vehicle status was ever seen on vehicles/NOSUCHVIN00000000/status")

        # a vehicle that was there once: its retained record says it is offline
        from agent.core.cose import Signer
        from agent.adapters.keys import load_private_key
        generate_keypair(keys, stem="vehicle")
        offline = Signer(load_private_key(keys / "vehicle.key")).sign(
            {"v": 1, "vin": "GONEVIN0000000000", "t": 1, "online": False, "agent": "0.1.0"})
        publish("127.0.0.1", broker.port, "vehicles/GONEVIN0000000000/status", offline,
                retain=True)
        proc = tool(*base, "--vin", "GONEVIN0000000000")
        assert proc.returncode == 1, proc.stderr
        assert proc.stderr == ("tcu-cloud: the vehicle is offline (its retained status on "
                               "vehicles/GONEVIN0000000000/status says online: false); the "
                               "command waits for it\n")
        assert json.loads(proc.stdout.splitlines()[-1])["error"] == (
            "no terminal status before the timeout")
