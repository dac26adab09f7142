"""The trust store file: which cloud keys may issue which commands (PROTOCOL.md §6).

    [[key]]
    name = "fleet-ops"                # unique, shown in logs and rejections
    public_key = "keys/fleet-ops.pub" # PEM file, relative to this file; or inline PEM text
    allow = ["charge.*", "doors.*", "state.snapshot"]   # fnmatch globs on command names

Read at start and again on SIGHUP; the result is an immutable TrustStore. Every problem is a
ConfigError with one line naming the file, the entry (`key.2.public_key`, 0-based like
`--set`) and what is wrong. Also refused: a trust store file that anyone may write to (it
decides who commands the vehicle); a group-writable one only gets a warning.
"""

from __future__ import annotations

import fnmatch
import logging
import os
import stat
import tomllib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from agent.core.commands import TrustedKey, TrustStore
from agent.errors import ConfigError, SigningError

from .keys import load_public_key

log = logging.getLogger("agent.truststore")

_ENTRY_KEYS = ("name", "public_key", "allow")


def load_trust_store(path: str | os.PathLike[str], names: Iterable[str]) -> TrustStore:
    """Read and validate a trust store TOML file. `names`: the command names this vehicle
    knows (Registry.names), to warn about patterns matching none. Raises ConfigError."""
    path = Path(path)
    commands = frozenset(names)
    try:
        with open(path, "rb") as f:
            mode = os.fstat(f.fileno()).st_mode
            raw = tomllib.loads(f.read().decode("utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such trust store file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read the trust store: {e}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: invalid TOML: {e}") from None
    if mode & stat.S_IWOTH:
        raise ConfigError(f"{path}: the trust store is writable by anyone (mode "
                          f"{mode & 0o777:04o}); run `chmod o-w {path}`")
    if mode & stat.S_IWGRP:
        log.warning("trust store %s is group-writable (mode %04o): whoever can write it can "
                    "command this vehicle", path, mode & 0o777)

    unknown = sorted(set(raw) - {"key"})
    if unknown:
        raise ConfigError(f"{path}: {unknown[0]}: unknown key (expected [[key]] entries)")
    entries = raw.get("key", [])
    if not isinstance(entries, list):
        raise ConfigError(f"{path}: key: expected [[key]] entries, got a single value")
    keys: list[TrustedKey] = []
    names: dict[str, int] = {}
    kids: dict[bytes, int] = {}
    for i, entry in enumerate(entries):
        key = _entry(path, i, entry, commands)
        if key.name in names:
            raise ConfigError(f"{path}: key.{i}.name: {key.name!r} is already the name of "
                              f"key.{names[key.name]}")
        if key.kid in kids:
            raise ConfigError(f"{path}: key.{i}.public_key: the same key as key.{kids[key.kid]} "
                              f"(kid {key.kid.hex()})")
        names[key.name], kids[key.kid] = i, i
        keys.append(key)
    if not keys:
        log.warning("trust store %s has no [[key]] entries: every command will be rejected "
                    "with UNKNOWN_KEY", path)
    return TrustStore(keys)


def _entry(path: Path, i: int, entry: Any, commands: frozenset[str]) -> TrustedKey:
    where = f"{path}: key.{i}"
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
        source = str(path.parent / Path(source).expanduser())
    try:
        public_key = load_public_key(source)
    except SigningError as e:
        raise ConfigError(f"{where}.public_key: {e}") from None
    return TrustedKey(name=name, public_key=public_key, allow=tuple(allow))
