"""Key files: generation (mode, atomicity, no overwrite), loading and its error messages."""

from __future__ import annotations

import os
import stat

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from agent.adapters.keys import generate_keypair, load_private_key, load_public_key
from agent.core.cose import Signer, kid_of, verify
from agent.errors import SigningError


def mode_of(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def raw(public) -> bytes:
    return public.public_bytes(Encoding.Raw, PublicFormat.Raw)


def write(path, data: bytes, mode: int) -> None:
    path.write_bytes(data)
    os.chmod(path, mode)


def test_generate_writes_a_0600_key_and_matching_public_key(tmp_path):
    directory = tmp_path / "new" / "keys"
    private_path, public_path, kid_hex = generate_keypair(directory)
    assert (private_path, public_path) == (directory / "vehicle.key", directory / "vehicle.pub")
    assert mode_of(private_path) == 0o600
    assert mode_of(directory) == 0o700
    assert private_path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")  # PKCS#8
    assert public_path.read_bytes().startswith(b"-----BEGIN PUBLIC KEY-----")  # SPKI

    private = load_private_key(private_path)
    public = load_public_key(str(public_path))
    assert raw(private.public_key()) == raw(public)
    assert kid_hex == kid_of(public).hex() and len(kid_hex) == 16
    # The pair works end to end for signing.
    signer = Signer(private)
    assert verify(signer.sign({"v": 1}), {bytes.fromhex(kid_hex): public}).payload == {"v": 1}
    # No temp files left behind.
    assert sorted(p.name for p in directory.iterdir()) == ["vehicle.key", "vehicle.pub"]


def test_key_is_0600_even_with_a_permissive_umask(tmp_path):
    old = os.umask(0)
    try:
        private_path, _, _ = generate_keypair(tmp_path, stem="cloud")
    finally:
        os.umask(old)
    assert private_path.name == "cloud.key"
    assert mode_of(private_path) == 0o600
    load_private_key(private_path)


def test_no_overwrite_without_force(tmp_path):
    private_path, public_path, kid_hex = generate_keypair(tmp_path)
    before = private_path.read_bytes(), public_path.read_bytes()
    with pytest.raises(SigningError) as info:
        generate_keypair(tmp_path)
    assert str(private_path) in str(info.value) and "--force" in str(info.value)
    assert (private_path.read_bytes(), public_path.read_bytes()) == before

    _, _, new_kid = generate_keypair(tmp_path, force=True)
    assert new_kid != kid_hex
    assert private_path.read_bytes() != before[0]
    assert mode_of(private_path) == 0o600
    assert kid_of(load_public_key(str(public_path))).hex() == new_kid


def test_no_overwrite_of_a_lone_public_key(tmp_path):
    (tmp_path / "vehicle.pub").write_text("keep me")
    with pytest.raises(SigningError):
        generate_keypair(tmp_path)
    assert (tmp_path / "vehicle.pub").read_text() == "keep me"
    assert not (tmp_path / "vehicle.key").exists()


def test_missing_key_names_path_and_generate_command(tmp_path):
    path = tmp_path / "vehicle.key"
    with pytest.raises(SigningError) as info:
        load_private_key(path)
    message = str(info.value)
    assert str(path) in message
    assert f"tcu-agent keys generate --dir {tmp_path}" in message
    assert "\n" not in message


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660, 0o602])
def test_refuse_key_accessible_by_group_or_others(tmp_path, mode):
    private_path, _, _ = generate_keypair(tmp_path)
    os.chmod(private_path, mode)
    with pytest.raises(SigningError) as info:
        load_private_key(private_path)
    assert f"chmod 600 {private_path}" in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("mode", [0o600, 0o400])
def test_owner_only_modes_accepted(tmp_path, mode):
    private_path, _, _ = generate_keypair(tmp_path)
    os.chmod(private_path, mode)
    load_private_key(private_path)


def test_malformed_private_keys(tmp_path):
    garbage = tmp_path / "garbage.key"
    write(garbage, b"not a key at all", 0o600)
    with pytest.raises(SigningError, match="not a PKCS#8 PEM"):
        load_private_key(garbage)

    # P-256 is the second supported type (ES256); other curves are refused.
    p384 = tmp_path / "p384.key"
    ec_pem = ec.generate_private_key(ec.SECP384R1()).private_bytes(
        Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    write(p384, ec_pem, 0o600)
    with pytest.raises(SigningError, match="not an Ed25519 or P-256 key .*secp384r1"):
        load_private_key(p384)

    encrypted = tmp_path / "encrypted.key"
    enc_pem = Ed25519PrivateKey.generate().private_bytes(
        Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.BestAvailableEncryption(b"pw")
    )
    write(encrypted, enc_pem, 0o600)
    with pytest.raises(SigningError, match="encrypted"):
        load_private_key(encrypted)

    directory = tmp_path / "dir.key"
    directory.mkdir(mode=0o700)
    with pytest.raises(SigningError):
        load_private_key(directory)


def test_public_key_inline_pem_and_path(tmp_path):
    _, public_path, kid_hex = generate_keypair(tmp_path)
    pem = public_path.read_text()
    from_path = load_public_key(str(public_path))
    from_text = load_public_key(pem)
    from_indented = load_public_key("\n   " + pem)
    assert raw(from_path) == raw(from_text) == raw(from_indented)
    assert kid_of(from_text).hex() == kid_hex
    assert raw(load_public_key(public_path)) == raw(from_path)  # a Path works too


def test_public_key_errors(tmp_path):
    with pytest.raises(SigningError, match="not found"):
        load_public_key(str(tmp_path / "missing.pub"))
    with pytest.raises(SigningError, match="inline public key"):
        load_public_key("-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n")
    ec_pub = ec.generate_private_key(ec.SECP384R1()).public_key().public_bytes(
        Encoding.PEM, PublicFormat.SubjectPublicKeyInfo
    )
    with pytest.raises(SigningError, match="not an Ed25519 or P-256 key"):
        load_public_key(ec_pub.decode())
    private_pem = tmp_path / "vehicle.key"
    generate_keypair(tmp_path)
    with pytest.raises(SigningError):
        load_public_key(private_pem.read_text())  # a private key is not a public key


def test_agent_without_uplink_still_refuses_a_missing_key(tmp_path, test_dbc):
    from agent.config import config_from_dict
    from agent.app.runtime import Agent

    raw = {"vehicle": {"vin": "V1"}, "storage": {"dir": str(tmp_path / "s")},
           "bus": [{"name": "a", "interface": "virtual", "channel": "x", "dbc": [str(test_dbc)]}],
           "signing": {"key_file": str(tmp_path / "none" / "vehicle.key")}}
    with pytest.raises(SigningError, match="tcu-agent keys generate"):
        Agent(config_from_dict(raw, base=tmp_path))


def test_es256_key_pair(tmp_path):
    private_path, public_path, kid_hex = generate_keypair(tmp_path, alg="es256")
    assert mode_of(private_path) == 0o600
    private = load_private_key(private_path)
    assert isinstance(private, ec.EllipticCurvePrivateKey) and private.curve.name == "secp256r1"
    public = load_public_key(str(public_path))
    point = public.public_bytes(Encoding.X962, PublicFormat.UncompressedPoint)
    import hashlib
    assert kid_hex == hashlib.sha256(point).hexdigest()[:16] == kid_of(public).hex()
    signer = Signer(private)
    assert signer.alg == -7
    assert verify(signer.sign({"v": 1}), {kid_of(public): public}).payload == {"v": 1}
    with pytest.raises(SigningError, match="unknown key algorithm"):
        generate_keypair(tmp_path / "x", alg="rsa")


def test_cli_generates_es256_keys(tmp_path):
    import subprocess
    import sys
    for prog, extra in (("agent", []), ("agent.cloud.main", ["--stem", "ops"])):
        out = tmp_path / prog
        run = subprocess.run([sys.executable, "-m", prog, "keys", "generate", "--dir", str(out),
                              "--alg", "es256", *extra], capture_output=True, text=True)
        assert run.returncode == 0, run.stderr
        stem = "ops" if extra else "vehicle"
        public = load_public_key(str(out / f"{stem}.pub"))
        assert isinstance(public, ec.EllipticCurvePublicKey)
        assert run.stdout.strip() == kid_of(public).hex()
    bad = subprocess.run([sys.executable, "-m", "agent", "keys", "generate", "--dir",
                          str(tmp_path / "b"), "--alg", "rsa"], capture_output=True, text=True)
    assert bad.returncode == 2 and "invalid choice" in bad.stderr
