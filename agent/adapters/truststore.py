"""The trust store file: which cloud keys may issue which commands (PROTOCOL.md §6).

    [[key]]
    name = "fleet-ops"                # unique, shown in logs and rejections
    public_key = "keys/fleet-ops.pub" # PEM file, relative to this file; or inline PEM text
    allow = ["charge.*", "doors.*", "state.snapshot"]   # fnmatch globs on command names

Read at start and again on SIGHUP; the result is an immutable TrustStore. Every problem is a
ConfigError with one line naming the file, the entry (`key.2.public_key`, 0-based like
`--set`) and what is wrong. Also refused: a trust store file that anyone may write to (it
decides who commands the vehicle); a group-writable one only gets a warning.

A store refreshed from a TUF repository (`trust.refresh`, agent/app/trustservice.py) is
installed under `{storage.dir}/trust/`: `v{N}.toml` (keys inline only: a downloaded file
names no local paths), then `state.json` {version, repository, target, sha256} written last,
atomically: the commit point. Once installed it is in force instead of `commands.trust_store`
(the factory default, and the way to work offline: delete `{storage.dir}/trust/` to go back).
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import logging
import os
import stat
import tomllib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from agent.core.commands import TrustedKey, TrustStore
from agent.errors import ConfigError, SigningError

from .atomic import atomic_write
from .keys import load_public_key

log = logging.getLogger("agent.truststore")

_ENTRY_KEYS = ("name", "public_key", "allow")


def load_trust_store(path: str | os.PathLike[str], names: Iterable[str]) -> TrustStore:
    """Read and validate a trust store TOML file. `names`: the command names this vehicle
    knows (Registry.names), to warn about patterns matching none. Raises ConfigError."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            mode = os.fstat(f.fileno()).st_mode
            data = f.read()
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such trust store file") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the trust store: {e}") from None
    if mode & stat.S_IWOTH:
        raise ConfigError(f"{path}: the trust store is writable by anyone (mode "
                          f"{mode & 0o777:04o}); run `chmod o-w {path}`")
    if mode & stat.S_IWGRP:
        log.warning("trust store %s is group-writable (mode %04o): whoever can write it can "
                    "command this vehicle", path, mode & 0o777)
    return parse_trust_store(data, str(path), names, base=path.parent)


def parse_trust_store(data: bytes, where: str, names: Iterable[str],
                      base: Path | None = None) -> TrustStore:
    """Validate trust store TOML text. With base=None (a downloaded store) every public key
    must be inline PEM. Raises ConfigError naming `where`."""
    commands = frozenset(names)
    try:
        raw = tomllib.loads(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError(f"{where}: cannot read the trust store: {e}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{where}: invalid TOML: {e}") from None
    unknown = sorted(set(raw) - {"key"})
    if unknown:
        raise ConfigError(f"{where}: {unknown[0]}: unknown key (expected [[key]] entries)")
    entries = raw.get("key", [])
    if not isinstance(entries, list):
        raise ConfigError(f"{where}: key: expected [[key]] entries, got a single value")
    keys: list[TrustedKey] = []
    seen_names: dict[str, int] = {}
    kids: dict[bytes, int] = {}
    for i, entry in enumerate(entries):
        key = _entry(where, base, i, entry, commands)
        if key.name in seen_names:
            raise ConfigError(f"{where}: key.{i}.name: {key.name!r} is already the name of "
                              f"key.{seen_names[key.name]}")
        if key.kid in kids:
            raise ConfigError(f"{where}: key.{i}.public_key: the same key as key.{kids[key.kid]} "
                              f"(kid {key.kid.hex()})")
        seen_names[key.name], kids[key.kid] = i, i
        keys.append(key)
    if not keys:
        log.warning("trust store %s has no [[key]] entries: every command will be rejected "
                    "with UNKNOWN_KEY", where)
    return TrustStore(keys)


# -- the refreshed store under {storage.dir}/trust/ ---------------------------------------------

TRUST_DIR = "trust"
STATE_FILE = "state.json"


def installed_info(storage_dir: Path) -> dict | None:
    """state.json of the installed refreshed store, or None when there is none. Raises
    ConfigError when it exists but cannot be read (the caller fails closed)."""
    path = Path(storage_dir) / TRUST_DIR / STATE_FILE
    try:
        info = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: unreadable: {e}") from None
    if (not isinstance(info, dict) or type(info.get("version")) is not int
            or not isinstance(info.get("file"), str) or not isinstance(info.get("sha256"), str)):
        raise ConfigError(f"{path}: not a trust store state record")
    return info


def load_installed(storage_dir: Path, info: dict, names: Iterable[str]) -> TrustStore:
    """The installed refreshed store named by `info`; ConfigError if missing or altered."""
    path = Path(storage_dir) / TRUST_DIR / Path(info["file"]).name
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the installed trust store: {e}") from None
    if hashlib.sha256(data).hexdigest() != info["sha256"]:
        raise ConfigError(f"{path}: does not match the sha256 recorded when it was installed")
    return parse_trust_store(data, str(path), names)


def install(storage_dir: Path, data: bytes, version: int, repository: str, target: str,
            now_ms: int) -> dict:
    """Write a validated store as version `version`, then commit it with state.json. Older
    versions' files are removed after the commit. Returns the new state record."""
    directory = Path(storage_dir) / TRUST_DIR
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    name = f"v{version}.toml"
    atomic_write(directory / name, data, 0o600)
    info = {"version": version, "file": name, "sha256": hashlib.sha256(data).hexdigest(),
            "repository": repository, "target": target, "installed_ms": now_ms}
    atomic_write(directory / STATE_FILE, json.dumps(info).encode(), 0o600)
    for old in directory.glob("v*.toml"):
        if old.name != name:
            old.unlink(missing_ok=True)
    return info


def current_trust_store(factory: Path, storage_dir: Path, names: Iterable[str]
                        ) -> tuple[TrustStore, dict]:
    """The store in force and where it came from ({"source", "version", ...}): the installed
    refreshed store if there is one, else the factory file. An installed store that cannot be
    read fails closed (an empty store, logged): falling back to the factory file could bring
    back a revoked key; the next refresh repairs it. Raises ConfigError for a bad factory file."""
    info = None
    try:
        info = installed_info(storage_dir)
        if info is not None:
            return load_installed(storage_dir, info, names), dict(info, source="tuf")
    except ConfigError as e:
        log.error("the refreshed trust store is unusable, refusing every command until the "
                  "next refresh: %s", e)
        version = info["version"] if isinstance(info, dict) else 0
        return TrustStore([]), {"source": "tuf (unusable)", "version": version, "error": str(e)}
    return load_trust_store(factory, names), {"source": str(factory), "version": 0}


def _entry(file: str, base: Path | None, i: int, entry: Any, commands: frozenset[str]) -> TrustedKey:
    where = f"{file}: key.{i}"
    if not isinstance(entry, dict):
        raise ConfigError(f"{where}: expected a table")
    unknown = sorted(set(entry) - set(_ENTRY_KEYS))
    if unknown:
        raise ConfigError(f"{where}.{unknown[0]}: unknown key (known: {', '.join(_ENTRY_KEYS)})")
    for name in _ENTRY_KEYS:
        if name not in entry:
            raise ConfigError(f"{where}.{name}: missing required key")

    name = entry["name"]
    if not isinstance(name, str) or not name or len(name) > 64 or not name.isprintable():
        raise ConfigError(f"{where}.name: must be 1-64 printable characters")

    allow = entry["allow"]
    if (not isinstance(allow, list) or not allow
            or not all(isinstance(p, str) and p for p in allow)):
        raise ConfigError(f"{where}.allow: must be a non-empty array of glob patterns "
                          "such as \"charge.*\"")
    for j, pattern in enumerate(allow):
        # A typo would silently authorise nothing; a later version or another vehicle may
        # know more names, so this is a warning, not an error.
        if not any(fnmatch.fnmatchcase(c, pattern) for c in commands):
            log.warning("%s.allow.%d: %r matches no command name this vehicle knows", where, j,
                        pattern)

    source = entry["public_key"]
    if not isinstance(source, str) or not source.strip():
        raise ConfigError(f"{where}.public_key: expected a PEM file path or inline PEM text")
    if not source.lstrip().startswith("-----BEGIN"):
        if base is None:
            raise ConfigError(f"{where}.public_key: must be inline PEM in a downloaded store")
        source = str(base / Path(source).expanduser())
    try:
        public_key = load_public_key(source)
    except SigningError as e:
        raise ConfigError(f"{where}.public_key: {e}") from None
    return TrustedKey(name=name, public_key=public_key, allow=tuple(allow))
