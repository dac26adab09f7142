"""Trust store files (agent.adapters.truststore): real TOML and PEM files in tmp_path."""

from __future__ import annotations

import logging
import os

import pytest
from cryptography.hazmat.primitives.asymmetric.ec import SECP256R1, SECP384R1, generate_private_key
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from agent.adapters.truststore import load_trust_store
from agent.core.cose import kid_of
from agent.errors import ConfigError

# The names of the v1 families, as the registry gives them (Registry.names).
NAMES = frozenset({"charge.start", "charge.stop", "charge.set_limit", "doors.lock",
                   "doors.unlock", "state.snapshot", "update.stage", "update.activate",
                   "update.cancel"})


def pem(key) -> str:
    return key.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo).decode()


@pytest.fixture
def keys(tmp_path):
    """Two key pairs, the first one's public key in tmp_path/keys/ops.pub."""
    ops, fleet = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "ops.pub").write_text(pem(ops))
    return ops, fleet


def write(tmp_path, text: str, name="trust.toml"):
    path = tmp_path / name
    path.write_text(text)
    os.chmod(path, 0o644)
    return path


def test_file_and_inline_keys(tmp_path, keys):
    ops, fleet = keys
    path = write(tmp_path, f'''
[[key]]
name = "ops"
public_key = "keys/ops.pub"
allow = ["charge.*", "doors.lock"]

[[key]]
name = "fleet"
public_key = """
{pem(fleet)}"""
allow = ["state.snapshot"]
''')
    store = load_trust_store(path, NAMES)
    assert len(store) == 2
    entry = store.get(kid_of(ops.public_key()))
    assert entry.name == "ops" and entry.allow == ("charge.*", "doors.lock")
    assert entry.allows("charge.set_limit") and not entry.allows("doors.unlock")
    assert store.get(kid_of(fleet.public_key())).name == "fleet"
    assert set(store.public_keys) == {kid_of(ops.public_key()), kid_of(fleet.public_key())}


def test_relative_paths_are_relative_to_the_trust_store_file(tmp_path, keys, monkeypatch):
    path = write(tmp_path, '[[key]]\nname = "ops"\npublic_key = "keys/ops.pub"\nallow = ["*"]\n')
    monkeypatch.chdir(tmp_path / "keys")  # would break a path resolved against the cwd
    assert len(load_trust_store(path, NAMES)) == 1


def test_absolute_path(tmp_path, keys):
    path = write(tmp_path, f'[[key]]\nname = "ops"\npublic_key = "{tmp_path}/keys/ops.pub"\n'
                           'allow = ["*"]\n')
    assert load_trust_store(path, NAMES).get(kid_of(keys[0].public_key())).name == "ops"


def test_empty_store_is_allowed_with_a_warning(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="agent.truststore"):
        store = load_trust_store(write(tmp_path, "# no keys yet\n"), NAMES)
    assert len(store) == 0
    assert "UNKNOWN_KEY" in caplog.text


def test_pattern_matching_no_command_is_a_warning(tmp_path, keys, caplog):
    path = write(tmp_path, '[[key]]\nname = "ops"\npublic_key = "keys/ops.pub"\n'
                           'allow = ["charge.strat", "doors.*"]\n')
    with caplog.at_level(logging.WARNING, logger="agent.truststore"):
        load_trust_store(path, NAMES)
    assert "key.0.allow.0" in caplog.text and "charge.strat" in caplog.text
    assert "allow.1" not in caplog.text


def test_patterns_are_checked_against_the_names_given(tmp_path, keys, caplog):
    """A configured action (say horn.honk) is a name the vehicle knows: no warning for it."""
    path = write(tmp_path, '[[key]]\nname = "ops"\npublic_key = "keys/ops.pub"\n'
                           'allow = ["horn.*"]\n')
    with caplog.at_level(logging.WARNING, logger="agent.truststore"):
        load_trust_store(path, NAMES)
    assert "key.0.allow.0" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="agent.truststore"):
        load_trust_store(path, NAMES | {"horn.honk"})
    assert "allow" not in caplog.text


BAD_PEM = "-----BEGIN PUBLIC KEY-----\\nAAAA\\n-----END PUBLIC KEY-----"
ENTRY = 'name = "ops"\npublic_key = "keys/ops.pub"\nallow = ["*"]\n'


@pytest.mark.parametrize("text,where,problem", [
    ('[[key]]\nname = "ops"\nallow = ["*"]\n', "key.0.public_key", "missing"),
    ('[[key]]\npublic_key = "keys/ops.pub"\nallow = ["*"]\n', "key.0.name", "missing"),
    ('[[key]]\nname = "ops"\npublic_key = "keys/ops.pub"\n', "key.0.allow", "missing"),
    (f'[[key]]\n{ENTRY}role = "admin"\n', "key.0.role", "unknown key"),
    (f'[[key]]\n{ENTRY}\n[extra]\nx = 1\n', "extra", "unknown key"),
    ('key = "ops"\n', "key", "[[key]]"),
    ('[[key]]\nname = ""\npublic_key = "keys/ops.pub"\nallow = ["*"]\n', "key.0.name", "printable"),
    ('[[key]]\nname = 7\npublic_key = "keys/ops.pub"\nallow = ["*"]\n', "key.0.name", "printable"),
    ('[[key]]\nname = "ops"\npublic_key = "keys/ops.pub"\nallow = []\n', "key.0.allow", "non-empty"),
    ('[[key]]\nname = "ops"\npublic_key = "keys/ops.pub"\nallow = "*"\n', "key.0.allow", "non-empty"),
    ('[[key]]\nname = "ops"\npublic_key = "keys/ops.pub"\nallow = [""]\n', "key.0.allow", "non-empty"),
    ('[[key]]\nname = "ops"\npublic_key = "keys/none.pub"\nallow = ["*"]\n', "key.0.public_key",
     "not found"),
    ('[[key]]\nname = "ops"\npublic_key = 5\nallow = ["*"]\n', "key.0.public_key", "PEM"),
    (f'[[key]]\nname = "ops"\nallow = ["*"]\npublic_key = "{BAD_PEM}"\n',
     "key.0.public_key", "not a SubjectPublicKeyInfo"),
    (f'[[key]]\n{ENTRY}\n[[key]]\nname = "ops"\npublic_key = "keys/other.pub"\nallow = ["*"]\n',
     "key.1.name", "already the name of key.0"),
    (f'[[key]]\n{ENTRY}\n[[key]]\nname = "twin"\npublic_key = "keys/ops.pub"\nallow = ["*"]\n',
     "key.1.public_key", "same key as key.0"),
    ("[[key]\n", "", "invalid TOML"),
])
def test_invalid_store_names_file_entry_and_problem(tmp_path, keys, text, where, problem):
    (tmp_path / "keys" / "other.pub").write_text(pem(Ed25519PrivateKey.generate()))
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_trust_store(path, NAMES)
    message = str(info.value)
    assert message.startswith(f"{path}: {where}"), message
    assert problem in message and "\n" not in message


def test_keys_other_than_ed25519_and_p256_are_refused(tmp_path):
    (tmp_path / "ec.pub").write_text(pem(generate_private_key(SECP384R1())))
    path = write(tmp_path, '[[key]]\nname = "ec"\npublic_key = "ec.pub"\nallow = ["*"]\n')
    with pytest.raises(ConfigError, match=r"key\.0\.public_key: .*not an Ed25519 or P-256 key"):
        load_trust_store(path, NAMES)


def test_p256_keys_are_trusted(tmp_path, keys):
    p256 = generate_private_key(SECP256R1())
    (tmp_path / "p256.pub").write_text(pem(p256))
    path = write(tmp_path, f'[[key]]\n{ENTRY}\n[[key]]\nname = "tpm-ops"\n'
                           f'public_key = "p256.pub"\nallow = ["doors.*"]\n')
    store = load_trust_store(path, NAMES)
    entry = store.get(kid_of(p256.public_key()))
    assert entry is not None and entry.name == "tpm-ops" and entry.allows("doors.lock")


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="no such trust store file"):
        load_trust_store(tmp_path / "absent.toml", NAMES)


def test_world_writable_store_is_refused_group_writable_warned(tmp_path, keys, caplog):
    path = write(tmp_path, f"[[key]]\n{ENTRY}")
    os.chmod(path, 0o666)
    with pytest.raises(ConfigError, match="writable by anyone"):
        load_trust_store(path, NAMES)
    os.chmod(path, 0o664)
    with caplog.at_level(logging.WARNING, logger="agent.truststore"):
        assert len(load_trust_store(path, NAMES)) == 1
    assert "group-writable" in caplog.text
