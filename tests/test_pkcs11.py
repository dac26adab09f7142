"""The vehicle key in a PKCS#11 token: SoftHSM2 tokens created by the tests themselves."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pkcs11
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from agent.adapters.keys import load_signing_key
from agent.adapters.pkcs11 import _lib, generate, open_key, read_pin
from agent.config import config_from_dict
from agent.core.cose import ALG_EDDSA, ALG_ES256, Signer, kid_of, verify
from agent.errors import ConfigError, SigningError
from support import softhsm
from support.agentproc import AgentProcess, SlcanFeeder, Verifier, wait_for
from support.mosquitto import Consumer, Mosquitto

ROOT = Path(__file__).resolve().parent.parent
PAYLOAD = {"v": 1, "vin": "V1", "seq": 1, "t0": 0, "sig": {"A.B": [[0, 1.5]]}}


@pytest.fixture(scope="module")
def hsm():
    return softhsm.shared_token()


def label() -> str:
    return f"k-{uuid.uuid4().hex[:12]}"


@pytest.mark.parametrize("alg,want", [("es256", ALG_ES256), ("eddsa", ALG_EDDSA)])
def test_generate_sign_verify(hsm, alg, want):
    name = label()
    key = generate(hsm["module"], "tcu", name, hsm["pin"], alg=alg)
    signer = Signer(key)
    assert signer.alg == want and signer.kid == kid_of(key.public_key)
    for compress in (False, True):
        message = signer.sign(PAYLOAD, compress=compress)
        assert verify(message, {signer.kid: key.public_key}).payload == PAYLOAD
    key.close()
    # Opened again by label (the agent's start): the same key.
    again = open_key(hsm["module"], "tcu", name, hsm["pin"])
    assert again.kid == signer.kid and again.alg == want
    assert verify(Signer(again).sign(PAYLOAD), {signer.kid: key.public_key}).payload == PAYLOAD
    # Two keys open at once (login is per token, not per session), each still signing.
    other = generate(hsm["module"], "tcu", label(), hsm["pin"], alg="eddsa")
    assert verify(Signer(again).sign(PAYLOAD), {signer.kid: key.public_key}).payload == PAYLOAD
    assert verify(Signer(other).sign(PAYLOAD), {other.kid: other.public_key}).payload == PAYLOAD
    other.close()
    assert verify(Signer(again).sign(PAYLOAD), {signer.kid: key.public_key}).payload == PAYLOAD
    again.close()


def test_private_key_never_leaves_the_token(hsm, tmp_path):
    name = label()
    before = set(os.listdir(tmp_path))
    generate(hsm["module"], "tcu", name, hsm["pin"], alg="es256").close()
    assert set(os.listdir(tmp_path)) == before
    token = _lib(hsm["module"]).get_token(token_label="tcu")
    with token.open(user_pin=hsm["pin"]) as session:
        private = session.get_key(pkcs11.ObjectClass.PRIVATE_KEY, label=name)
        assert private[pkcs11.Attribute.SENSITIVE] is True
        assert private[pkcs11.Attribute.EXTRACTABLE] is False
        assert private[pkcs11.Attribute.NEVER_EXTRACTABLE] is True
        with pytest.raises(pkcs11.AttributeSensitive):
            private[pkcs11.Attribute.VALUE]


def test_errors_are_one_line(hsm, tmp_path):
    name = label()
    generate(hsm["module"], "tcu", name, hsm["pin"]).close()
    cases = [
        (lambda: open_key(hsm["module"], "tcu", name, "wrong-pin"), "wrong PIN"),
        (lambda: open_key(hsm["module"], "absent", name, hsm["pin"]), "no PKCS#11 token labelled 'absent'"),
        (lambda: open_key(hsm["module"], "tcu", "nothing", hsm["pin"]), "no key pair labelled 'nothing'"),
        (lambda: generate(hsm["module"], "tcu", name, hsm["pin"]), "already holds a key labelled"),
        (lambda: open_key(tmp_path / "none.so", "tcu", name, hsm["pin"]), "cannot load the PKCS#11 module"),
    ]
    for call, text in cases:
        with pytest.raises(SigningError) as info:
            call()
        assert text in str(info.value) and "\n" not in str(info.value)

    loose = tmp_path / "loose.pin"
    loose.write_text(hsm["pin"])
    os.chmod(loose, 0o644)
    with pytest.raises(SigningError, match="chmod 600"):
        read_pin(loose)
    empty = tmp_path / "empty.pin"
    empty.write_text("\n")
    os.chmod(empty, 0o600)
    with pytest.raises(SigningError, match="empty"):
        read_pin(empty)


def test_mismatched_public_and_private_keys_are_refused(hsm):
    a, b, mixed = label(), label(), label()
    generate(hsm["module"], "tcu", a, hsm["pin"]).close()
    generate(hsm["module"], "tcu", b, hsm["pin"]).close()
    token = _lib(hsm["module"]).get_token(token_label="tcu")
    with token.open(rw=True, user_pin=hsm["pin"]) as session:
        session.get_key(pkcs11.ObjectClass.PRIVATE_KEY, label=a)[pkcs11.Attribute.LABEL] = mixed
        session.get_key(pkcs11.ObjectClass.PUBLIC_KEY, label=b)[pkcs11.Attribute.LABEL] = mixed
    with pytest.raises(SigningError, match="do not match"):
        open_key(hsm["module"], "tcu", mixed, hsm["pin"])


def test_signing_config(hsm, tmp_path, test_dbc):
    name = label()
    key = generate(hsm["module"], "tcu", name, hsm["pin"])
    kid = key.kid
    key.close()
    pkcs = {"module": str(hsm["module"]), "token": "tcu", "key_label": name,
            "pin_file": str(hsm["pin_file"])}
    base = {"vehicle": {"vin": "V1"}, "storage": {"dir": str(tmp_path / "s")},
            "bus": [{"name": "a", "interface": "virtual", "channel": "x", "dbc": [str(test_dbc)]}]}
    config = config_from_dict(dict(base, signing={"pkcs11": pkcs}), base=tmp_path)
    loaded = load_signing_key(config.signing)
    assert Signer(loaded).kid == kid
    loaded.close()
    for signing, text in [
        ({}, "set exactly one of key_file and pkcs11"),
        ({"pkcs11": pkcs, "key_file": "k.key"}, "set exactly one"),
        ({"pkcs11": dict(pkcs, module=str(tmp_path / "no.so"))}, "signing.pkcs11.module: no such file"),
        ({"pkcs11": dict(pkcs, pin_file=str(tmp_path / "no.pin"))}, "signing.pkcs11.pin_file: no such file"),
        ({"pkcs11": {k: v for k, v in pkcs.items() if k != "token"}}, "signing.pkcs11.token: missing"),
    ]:
        with pytest.raises(ConfigError, match=text):
            config_from_dict(dict(base, signing=signing), base=tmp_path)


def test_cli_generate_in_a_token(tmp_path):
    token = softhsm.make_token(tmp_path / "hsm")
    pub = tmp_path / "vehicle.pub"
    cmd = [sys.executable, "-m", "agent", "keys", "generate", "--pkcs11", str(token["module"]),
           "--token", "tcu", "--key-label", "vehicle", "--pin-file", str(token["pin_file"]),
           "--pub", str(pub)]
    run = subprocess.run(cmd, capture_output=True, text=True, env=token["env"], cwd=ROOT)
    assert run.returncode == 0, run.stderr
    kid, pem = run.stdout.split("\n", 1)
    public = load_pem_public_key(pem.encode())
    assert isinstance(public, ec.EllipticCurvePublicKey) and kid == kid_of(public).hex()
    assert pub.read_text() == pem
    assert "pkcs11 = { module" in run.stderr
    # Nothing secret was written anywhere under the test directory.
    for path in tmp_path.rglob("*"):
        if path.is_file() and "tokens" not in path.parts:
            assert b"PRIVATE KEY" not in path.read_bytes(), path

    again = subprocess.run(cmd, capture_output=True, text=True, env=token["env"], cwd=ROOT)
    assert again.returncode == 2 and "already holds a key" in again.stderr
    eddsa = subprocess.run(cmd[:-2] + ["--key-label", "ed", "--alg", "eddsa"], capture_output=True,
                           text=True, env=token["env"], cwd=ROOT)
    assert eddsa.returncode == 0, eddsa.stderr
    assert isinstance(load_pem_public_key(eddsa.stdout.split("\n", 1)[1].encode()), Ed25519PublicKey)
    usage = subprocess.run(cmd[:7], capture_output=True, text=True, env=token["env"], cwd=ROOT)
    assert usage.returncode == 2 and "needs --token and --pin-file" in usage.stderr


@pytest.mark.mqtt
def test_agent_signs_with_the_token_key(tmp_path, test_dbc, monkeypatch):
    """The whole agent, its key in a token: telemetry and statuses verify under its kid."""
    token = softhsm.make_token(tmp_path / "hsm")
    monkeypatch.setenv("SOFTHSM2_CONF", str(token["conf"]))
    run = subprocess.run([sys.executable, "-m", "agent", "keys", "generate", "--pkcs11",
                          str(token["module"]), "--token", "tcu", "--pin-file",
                          str(token["pin_file"])], capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 0, run.stderr
    public = load_pem_public_key(run.stdout.split("\n", 1)[1].encode())
    feeder = SlcanFeeder(tmp_path, test_dbc).start()
    try:
        with Mosquitto() as broker, Consumer(broker.host, broker.port, "vehicles/#") as c:
            agent = AgentProcess(tmp_path, test_dbc, feeder.link,
                                 {"host": broker.host, "port": broker.port})
            text = agent.config.read_text()
            old = f'key_file = "{agent.keydir / "vehicle.key"}"'
            assert old in text
            agent.config.write_text(text.replace(old, (
                f'pkcs11 = {{ module = "{token["module"]}", token = "tcu", '
                f'key_label = "vehicle", pin_file = "{token["pin_file"]}" }}')))
            agent.start()
            try:
                v = Verifier(public)
                wait_for(lambda: len(v.check(c.messages).get("telemetry", [])) >= 3,
                         what="3 telemetry batches signed in the token")
                assert v.check(c.messages)["status"][0]["online"] is True
                assert agent.terminate() == 0
            finally:
                agent.close()
            assert v.check(c.messages)["status"][-1]["online"] is False
    finally:
        feeder.close()


MDWE_SCRIPT = """
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
# PR_SET_MDWE / PR_MDWE_REFUSE_EXEC_GAIN: what MemoryDenyWriteExecute=yes enforces
if libc.prctl(65, 1, 0, 0, 0) != 0:
    sys.exit("PR_SET_MDWE refused: " + os.strerror(ctypes.get_errno()))
from agent.adapters.pkcs11 import generate
from agent.core.cose import Signer, verify
key = generate(sys.argv[1], "tcu", "mdwe", sys.argv[2], alg=sys.argv[3])
signer = Signer(key)
print(verify(signer.sign({"v": 1}), {signer.kid: signer.public_key}).payload)
"""


@pytest.mark.parametrize("alg", ["es256", "eddsa"])
def test_the_token_works_under_memory_deny_write_execute(tmp_path, alg):
    """The unit's MemoryDenyWriteExecute=yes, as the kernel's PR_SET_MDWE: the PKCS#11 module
    loads and signs (no writable-executable mappings needed)."""
    token = softhsm.make_token(tmp_path)
    run = subprocess.run([sys.executable, "-c", MDWE_SCRIPT, str(token["module"]), token["pin"], alg],
                         capture_output=True, text=True, env=dict(token["env"], PYTHONPATH=str(ROOT)),
                         cwd=ROOT, timeout=60)
    assert run.returncode == 0 and run.stdout.strip() == "{'v': 1}", run.stderr
