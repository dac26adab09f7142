"""Checking a message received on `{prefix}/commands` (PROTOCOL.md §6, §7). Sans-I/O.

`CommandGate.check(message, now_ms, seen)` runs these checks in this order; the first failure
is the answer and nothing after it runs:

  1. envelope: size <= max_message_bytes, tagged COSE_Sign1, alg, content type  BAD_ENVELOPE
  2. `kid` in the trust store                                                   UNKNOWN_KEY
  3. signature                                                                  BAD_SIGNATURE
  4. payload schema (§6), the detail names the field                            BAD_ENVELOPE
  5. `vin` is this vehicle's                                                    WRONG_VEHICLE
  6. identical re-delivery (same id, same signed bytes)             -> Redelivery (no rejection)
  7. time window: exp in the past, iat too far ahead, exp - iat too long        EXPIRED
  8. replay: id seen with other bytes, or possibly seen before the replay
     memory was lost                                                            REPLAYED
  9. authorisation: the key's `allow` globs against the name                    UNAUTHORIZED
 10. the name is in the command registry (core/registry.py)                    UNKNOWN_COMMAND
 11. parameters: the name's family's check_params raised ParamError            BAD_PARAMS

`CommandGate.precheck(message)` is the cheap prefix of steps 1-2 (size, envelope structure,
kid lookup; no signature, no payload decoding): it lets the runtime drop garbage and strangers
for microseconds before any budget is spent (core/ratelimit.py Admission). It gives the same
reasons and details as check() for what it refuses, and a `Screened` with the message's
fingerprint otherwise: sha256 over the protected header, payload and signature bytes -- the
signed parts. The unprotected header is not signed, so copies padded there are the same
command and have the same fingerprint.

Choices where the protocol is silent:
- The id is only ever read from a VERIFIED payload: a rejection for steps 1-3 carries
  id None. Echoing an unauthenticated id would let anyone who can publish on the commands
  topic make the vehicle emit a signed REJECTED for somebody else's command in flight.
- "Identical bytes" means the signed payload bytes (after decompression), not the whole
  message: the outer COSE bytes can be altered without the key (unprotected header labels,
  non-shortest CBOR length heads), which would turn an authentic command into a REPLAYED
  rejection of its id. `Command.digest` is sha256 of those payload bytes.
- Re-delivery is recognised BEFORE the time window, so an identical copy arriving after
  `exp` gets the command's latest status again instead of a contradicting EXPIRED. It is
  recognised after the signature and vin checks, so a key removed from the trust store no
  longer gets answers.
- Payload keys other than v/id/vin/name/params/iat/exp are rejected (BAD_ENVELOPE): a
  field the vehicle does not understand (say "nbf") must not be silently ignored.
  `exp <= iat` is a schema error too.
- Rejections from steps 9-11 carry `digest` and `exp`: the command is authentic, fresh and
  for this vehicle, so the runtime should record its id like an accepted one. Then a
  re-delivery gets the same REJECTED again, never a second, different terminal status.
- A failure of the `seen` callable (replay store unavailable) is INTERNAL_ERROR: fail closed.
- Parameters are each family's own (core/executor.py for actions and state, core/updates.py
  for update, ...); a family decides nothing about the other steps.

The runtime's part: record an Accepted command's id (ReplayStore.record) BEFORE executing it,
store every status it signs (set_status) and re-send the latest one on a Redelivery.
"""

from __future__ import annotations

import fnmatch
import hashlib
import re
import types
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from agent.errors import ParamError, VerificationError

from . import cose
from .clock import TrustedClock
from .protocol import (
    BAD_ENVELOPE,
    BAD_PARAMS,
    EXPIRED,
    INTERNAL_ERROR,
    REJECTED,
    REPLAYED,
    UNAUTHORIZED,
    UNKNOWN_COMMAND,
    UNKNOWN_KEY,
    WRONG_VEHICLE,
)
from .registry import Registry
from .registry import show as _show


@dataclass(frozen=True, slots=True)
class GateLimits:
    """The gate's bounds (config [commands] carries the same names)."""

    max_skew_ms: int = 30_000  # how far in the future `iat` may be (clock skew)
    max_lifetime_ms: int = 600_000  # longest accepted exp - iat
    max_message_bytes: int = 65_536  # larger messages: BAD_ENVELOPE


# -- trust store ---------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class TrustedKey:
    """A cloud key allowed to issue the command names matching `allow` (fnmatch globs).

    The key is Ed25519 or P-256 (TypeError otherwise); its type fixes the alg it signs with."""

    name: str
    public_key: cose.PublicKey
    allow: tuple[str, ...]
    kid: bytes = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "kid", cose.kid_of(self.public_key))
        object.__setattr__(self, "allow", tuple(self.allow))

    def allows(self, command_name: str) -> bool:
        return any(fnmatch.fnmatchcase(command_name, p) for p in self.allow)


class TrustStore:
    """Immutable set of trusted keys, looked up by kid. Raises ValueError on duplicates."""

    __slots__ = ("_by_kid", "_public")

    def __init__(self, entries: Iterable[TrustedKey] = ()):
        by_kid: dict[bytes, TrustedKey] = {}
        names: set[str] = set()
        for entry in entries:
            if entry.name in names:
                raise ValueError(f"duplicate trusted key name {entry.name!r}")
            if entry.kid in by_kid:
                raise ValueError(f"keys {by_kid[entry.kid].name!r} and {entry.name!r} are the "
                                 f"same key (kid {entry.kid.hex()})")
            names.add(entry.name)
            by_kid[entry.kid] = entry
        self._by_kid = types.MappingProxyType(by_kid)
        self._public = types.MappingProxyType({k: e.public_key for k, e in by_kid.items()})

    def get(self, kid: bytes) -> TrustedKey | None:
        return self._by_kid.get(kid)

    @property
    def public_keys(self) -> Mapping[bytes, cose.PublicKey]:
        """kid -> public key, as cose.verify wants it."""
        return self._public

    @property
    def entries(self) -> tuple[TrustedKey, ...]:
        return tuple(self._by_kid.values())

    def __len__(self) -> int:
        return len(self._by_kid)


# -- outcomes ------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Command:
    """A verified, authorised command with valid parameters."""

    id: str
    vin: str
    name: str
    params: Mapping[str, Any]  # read-only
    iat: int
    exp: int
    kid: bytes
    key_name: str
    digest: bytes  # sha256 of the signed payload bytes: tells a re-delivery from a replay


@dataclass(frozen=True, slots=True)
class Accepted:
    command: Command


@dataclass(frozen=True, slots=True)
class Rejected:
    """Answer REJECTED with `reason`. `id` is None unless read from a verified payload.

    `digest`/`exp` are set when the runtime should record the id like an accepted command's
    (UNAUTHORIZED, UNKNOWN_COMMAND, BAD_PARAMS), so a re-delivery gets this same answer.
    """

    id: str | None
    reason: str
    detail: str
    digest: bytes | None = None
    exp: int | None = None


@dataclass(frozen=True, slots=True)
class Redelivery:
    """The same command again (byte-identical payload): re-send its latest status."""

    id: str


@dataclass(frozen=True, slots=True)
class Screened:
    """A message that passed precheck(): well-formed COSE_Sign1 under a trusted kid."""

    kid: bytes
    fingerprint: bytes  # sha256 of the signed parts (see the module docstring)


Outcome = Accepted | Rejected | Redelivery
Seen = Callable[[str], "bytes | None"]


# -- the gate ------------------------------------------------------------------------------

# First bytes a tagged item can start with: tag 18 itself (0xd2), or a tag number in the
# following 1-8 bytes (non-shortest 18, the 55799 self-describe prefix): cose decides those.
_TAG_HEADS = frozenset({0xD2, 0xD8, 0xD9, 0xDA, 0xDB})
_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}", re.ASCII)
_FIELDS = ("v", "id", "vin", "name", "params", "iat", "exp")


class _Reject(Exception):
    def __init__(self, reason: str, detail: str):
        self.reason, self.detail = reason, detail


def _is_uint(value: Any) -> bool:
    return type(value) is int and value >= 0


class CommandGate:
    """Decides what to do with one message from the commands topic. See the module docstring."""

    def __init__(self, trust: TrustStore, vin: str, limits: GateLimits, registry: Registry,
                 clock: TrustedClock | None = None):
        """clock: the time floor (core/clock.py); with it, check() takes mono_ms and evaluates
        the time window against clock.now_ms(now_ms, mono_ms), and an accepted command's iat
        raises the floor."""
        self.clock = clock
        self._trust = trust
        self.vin = vin
        self.registry = registry
        self.max_message_bytes = limits.max_message_bytes
        self.max_skew_ms = limits.max_skew_ms
        self.max_lifetime_ms = limits.max_lifetime_ms
        self._replay_floor_ms = 0  # iat below this: possibly seen before the memory was lost

    @property
    def trust(self) -> TrustStore:
        return self._trust

    def replace_trust(self, store: TrustStore) -> None:
        """Swap in a reloaded trust store (SIGHUP); a check in progress keeps the old one."""
        self._trust = store

    def note_replay_loss(self, lost_at_ms: int | None) -> None:
        """The replay memory was lost at `lost_at_ms` (corrupt database): from now on refuse,
        as REPLAYED, every command that might have been received before then, i.e. issued
        before lost_at_ms + max_skew_ms. Those would be expired within max_lifetime_ms anyway,
        so the refusal costs only the commands in flight at the time of the loss."""
        if lost_at_ms is not None:
            self._replay_floor_ms = max(self._replay_floor_ms, lost_at_ms + self.max_skew_ms)

    def precheck(self, message: bytes) -> Screened | Rejected:
        """Steps 1-2 without the signature or the payload (see the module docstring); a
        Rejected here is what check() would answer. Never raises."""
        try:
            size = memoryview(message).nbytes
            if size > self.max_message_bytes:
                return Rejected(None, BAD_ENVELOPE, f"message is {size} bytes, over the "
                                                    f"{self.max_message_bytes}-byte limit")
            if size == 0 or message[0] not in _TAG_HEADS:  # no CBOR tag at all: no decoding
                return Rejected(None, BAD_ENVELOPE, "not a tagged COSE_Sign1 (CBOR tag 18)")
            env = cose._parse(message, self.max_message_bytes)
        except VerificationError as e:
            return Rejected(None, e.reason, str(e))
        except Exception as e:  # noqa: BLE001 - a network-facing path must answer, fail closed
            return Rejected(None, BAD_ENVELOPE, f"unexpected {type(e).__name__} reading a command")
        if self._trust.get(env.kid) is None:
            return Rejected(None, UNKNOWN_KEY, f"unknown signing key kid={env.kid.hex()}")
        h = hashlib.sha256()
        for part in (env.protected, env.payload, env.signature):
            h.update(len(part).to_bytes(4, "big"))
            h.update(part)
        return Screened(env.kid, h.digest())

    def check(self, message: bytes, now_ms: int, seen: Seen, mono_ms: int = 0) -> Outcome:
        """Accepted, Rejected or Redelivery for one received message. Never raises.

        `seen(id)` returns the digest recorded for that id, or None (the replay store).
        now_ms is the system clock; mono_ms a monotonic clock (only used with a `clock`).
        """
        try:
            if self.clock is None:
                return self._check(message, now_ms, seen)
            outcome = self._check(message, self.clock.now_ms(now_ms, mono_ms), seen)
            if isinstance(outcome, Accepted):
                self.clock.observe(outcome.command.iat, mono_ms, "command")
            return outcome
        except Exception as e:  # noqa: BLE001 - a network-facing path must answer, fail closed
            return Rejected(None, INTERNAL_ERROR, f"unexpected {type(e).__name__} checking a command")

    def _check(self, message: bytes, now_ms: int, seen: Seen) -> Outcome:
        trust = self._trust  # one store for the whole check, even across a reload
        size = memoryview(message).nbytes if isinstance(message, (bytes, bytearray, memoryview)) else None
        if size is not None and size > self.max_message_bytes:
            return Rejected(None, BAD_ENVELOPE,
                            f"message is {size} bytes, over the {self.max_message_bytes}-byte limit")
        try:
            verified = cose.verify(message, trust.public_keys)
        except VerificationError as e:
            return Rejected(None, e.reason, str(e))
        key = trust.get(verified.kid)
        payload = verified.payload
        cid = payload.get("id")
        cid = cid if type(cid) is str and _ID.fullmatch(cid) else None
        try:
            _check_schema(payload)
        except _Reject as r:
            return Rejected(cid, r.reason, r.detail)
        if payload["vin"] != self.vin:
            return Rejected(cid, WRONG_VEHICLE, f"command is for vehicle {_show(payload['vin'])}")

        digest = hashlib.sha256(verified.payload_bytes).digest()
        try:
            previous = seen(cid)
        except Exception as e:  # noqa: BLE001 - storage trouble must not execute anything
            return Rejected(cid, INTERNAL_ERROR, f"replay store unavailable: {e}"[:200])
        if previous is not None and previous == digest:
            return Redelivery(cid)

        iat, exp = payload["iat"], payload["exp"]
        if exp <= now_ms:
            return Rejected(cid, EXPIRED, f"expired {now_ms - exp} ms ago")
        if iat > now_ms + self.max_skew_ms:
            return Rejected(cid, EXPIRED, "issued in the future")
        if exp - iat > self.max_lifetime_ms:
            return Rejected(cid, EXPIRED, f"lifetime too long: {exp - iat} ms, at most "
                                          f"{self.max_lifetime_ms} ms accepted")

        if previous is not None:
            return Rejected(cid, REPLAYED, "this id was already used for a different command")
        if iat < self._replay_floor_ms:  # read after seen(): it may have noted a loss just now
            return Rejected(cid, REPLAYED, "issued before the vehicle lost its replay memory; "
                                           "re-issue the command with a new id")

        name, params = payload["name"], payload["params"]
        try:
            if not key.allows(name):
                raise _Reject(UNAUTHORIZED, f"key {key.name!r} may not issue {_show(name)}")
            family = self.registry.family_of(name)
            if family is None:
                raise _Reject(UNKNOWN_COMMAND, f"no command {_show(name)} on this vehicle")
            try:
                family.check_params(name, params)
            except ParamError as e:
                raise _Reject(BAD_PARAMS, e.detail) from None
        except _Reject as r:
            return Rejected(cid, r.reason, r.detail, digest=digest, exp=exp)
        return Accepted(Command(id=cid, vin=payload["vin"], name=name,
                                params=types.MappingProxyType(dict(params)), iat=iat, exp=exp,
                                kid=verified.kid, key_name=key.name, digest=digest))


def _check_schema(p: dict) -> None:
    """§6 payload shape; raises _Reject(BAD_ENVELOPE, "<field>: <problem>")."""
    def bad(name: str, problem: str) -> _Reject:
        return _Reject(BAD_ENVELOPE, f"{name}: {problem}")

    for name in _FIELDS:
        if name not in p:
            raise bad(name, "missing")
    extra = sorted(set(p) - set(_FIELDS))
    if extra:
        raise bad(_show(extra[0]), "unknown field in a version 1 command")
    if type(p["v"]) is not int or p["v"] != 1:
        raise bad("v", f"must be 1, got {_show(p['v'])}")
    if type(p["id"]) is not str or not _ID.fullmatch(p["id"]):
        raise bad("id", "must be 1-64 characters of A-Z a-z 0-9 . _ : -")
    for name in ("vin", "name"):
        if type(p[name]) is not str:
            raise bad(name, "must be a text string")
    if type(p["params"]) is not dict or not all(type(k) is str for k in p["params"]):
        raise bad("params", "must be a map with text keys")
    for name in ("iat", "exp"):
        if not _is_uint(p[name]):
            raise bad(name, "must be an unsigned integer (ms since the epoch)")
    if p["exp"] <= p["iat"]:
        raise bad("exp", "must be later than iat")
