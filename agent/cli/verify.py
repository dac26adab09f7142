"""`tcu-agent verify --pub PUB FILE...`: verify stored signed messages, print their payloads."""

from __future__ import annotations

import io
import json
import sqlite3
import sys
from pathlib import Path

import cbor2

from ..errors import AgentError, LogFormatError, VerificationError


def add_parser(sub, common) -> None:
    p = sub.add_parser("verify", help="verify signed messages and print their payloads",
                       description="Verify COSE_Sign1 messages stored in files — a CBOR sequence "
                                   "(e.g. `replay --key K --out FILE`), a single message, or an "
                                   "agent outbox.db — and print each payload as a JSON line. "
                                   "Exit 1 if any message fails verification.")
    p.add_argument("files", nargs="+", help="files holding signed messages")
    p.add_argument("--pub", action="append", required=True,
                   help="trusted public key (SubjectPublicKeyInfo PEM); repeatable")
    common(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from ..adapters.keys import load_public_key
    from ..core.cose import kid_of, verify

    keys = {}
    for pub in args.pub:
        key = load_public_key(pub)
        keys[kid_of(key)] = key
    good = bad = 0
    for path in args.files:
        found = 0
        for where, message in messages_in(Path(path)):
            found += 1
            try:
                v = verify(message, keys)
            except VerificationError as e:
                bad += 1
                print(json.dumps({"file": where, "error": e.reason, "detail": str(e)}))
                continue
            good += 1
            print(json.dumps({"file": where, "kid": v.kid.hex(), "content_type": v.content_type,
                              "payload": v.payload}, default=_json_default))
        if not found:  # "0 verified" and exit 0 would read as a pass
            empty = Path(path).stat().st_size == 0
            raise LogFormatError(f"{path}: {'empty file, ' if empty else ''}no signed messages "
                                 "to verify")
    print(f"{good} verified, {bad} failed", file=sys.stderr)
    return 1 if bad else 0


def messages_in(path: Path):
    """Yield (label, message bytes) from a CBOR sequence file or an outbox SQLite database."""
    if not path.is_file():
        raise AgentError(f"{path}: no such file")
    head = path.open("rb").read(16)
    if head.startswith(b"SQLite format 3"):
        try:
            with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
                rows = db.execute("SELECT id, topic, payload FROM messages ORDER BY id").fetchall()
        except sqlite3.Error as e:
            raise AgentError(f"{path}: not a readable outbox database: {e}") from None
        for row_id, topic, payload in rows:
            yield f"{path}#{row_id} {topic}", bytes(payload)
        return
    data = path.read_bytes()
    fp = io.BytesIO(data)
    while fp.tell() < len(data):
        start = fp.tell()
        try:
            cbor2.load(fp)
        except Exception as e:  # cbor2 raises several types on garbage
            raise LogFormatError(f"{path}: not CBOR at byte {start}: {e}") from None
        yield f"{path}@{start}", data[start:fp.tell()]


def _json_default(value):
    if isinstance(value, bytes):
        return value.hex()
    return str(value)
