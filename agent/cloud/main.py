"""`tcu-cloud`: the reference cloud-side tool for developers and tests.

    tcu-cloud keys generate --dir DIR
    tcu-cloud command --broker HOST:PORT --vin VIN --key cloud.key --name charge.set_limit \
        --param percent=80 [--ttl 60] [--pub vehicle.pub]
    tcu-cloud listen --broker HOST:PORT --vin VIN --pub vehicle.pub
    tcu-cloud campaign apply FILE.toml|json / remove ID / list  --broker ... --key cloud.key
    tcu-cloud grant --key backend.key --vin VIN --driver-pub phone.pub --rental R1 --allow 'doors.*'

It speaks PROTOCOL.md exactly as a third-party cloud service would: it signs commands with
its own key and verifies everything the vehicle sends.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
import tomllib
import uuid

from ..errors import AgentError

MAX_TTL_S = 86400.0
# A REJECTED with id null is the vehicle's answer to a message it could not verify (it never
# echoes an unverified id). Arriving this soon after our publish, it is most likely ours.
NULL_ID_WINDOW_S = 5.0
TERMINAL = ("SUCCEEDED", "FAILED", "REJECTED", "TIMED_OUT")


class Parser(argparse.ArgumentParser):
    """argparse with a short error: the message and a pointer to --help, not the usage."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n(see {self.prog} --help)\n")


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 < value <= MAX_TTL_S:  # also false for nan
        raise argparse.ArgumentTypeError(f"{text}: must be > 0 and <= {MAX_TTL_S:.0f} s")
    return value


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: must be a whole number >= 1")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="tcu-cloud", description="Reference cloud-side tool: "
               "sign commands, verify what vehicles send.")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    keys = sub.add_parser("keys", help="cloud signing keys").add_subparsers(
        dest="keys_command", metavar="ACTION", required=True)
    g = keys.add_parser("generate", help="write cloud.key (0600) and cloud.pub")
    g.add_argument("--dir", required=True)
    g.add_argument("--force", action="store_true")
    g.add_argument("--stem", default="cloud",
                   help="write STEM.key and STEM.pub (default: cloud), e.g. one key per fleet")
    g.add_argument("--alg", choices=("eddsa", "es256"), default="eddsa",
                   help="eddsa: Ed25519 (default); es256: ECDSA P-256")
    g.set_defaults(func=_keys_generate)

    c = sub.add_parser("command", help="sign and send a command; print its statuses",
                       description="Sign a command, publish it, print every status for it as "
                                   "a JSON line until the terminal one. Exit 0 on SUCCEEDED, "
                                   "1 otherwise. A REJECTED without an id (the vehicle could "
                                   "not verify a message) within "
                                   f"{NULL_ID_WINDOW_S:.0f} s is taken as the answer.")
    _connection(c)
    c.add_argument("--key", required=True, help="cloud private key (PKCS#8 PEM)")
    c.add_argument("--name", required=True, help="command name, e.g. charge.start")
    c.add_argument("--param", action="append", default=[], metavar="K=V",
                   help="parameter; the value is TOML (80, \"text\", true); repeatable")
    c.add_argument("--ttl", type=_seconds, default=60.0,
                   help=f"seconds until exp (60; at most {MAX_TTL_S:.0f})")
    c.add_argument("--id", help="command id (default: a fresh random one)")
    c.add_argument("--pub", help="vehicle public key: verify the responses (recommended)")
    c.add_argument("--timeout", type=_seconds, help="give up after this many s (default ttl + 10)")
    c.add_argument("--grant", help="a rental grant (tcu-cloud grant): --key is then the "
                                   "driver's key the grant names")
    c.set_defaults(func=_command)

    li = sub.add_parser("listen", help="verify and print everything a vehicle sends",
                        description="Subscribe to the vehicle's topics, verify every message "
                                    "and print it as a JSON line; flags bad signatures and seq "
                                    "gaps.")
    _connection(li)
    li.add_argument("--pub", required=True, help="vehicle public key (PEM)")
    li.add_argument("--count", type=_count, help="exit after this many messages")
    li.add_argument("--duration", type=_seconds, help="exit after this many seconds")
    li.set_defaults(func=_listen)

    _campaign_parser(sub)
    from .repo import add_parser as add_repo_parser
    add_repo_parser(sub)
    from .grant import add_parser as add_grant_parser
    add_grant_parser(sub)
    return p


def _campaign_parser(sub) -> None:
    """`tcu-cloud campaign apply FILE | remove ID | list`: campaign.* commands (§8)."""
    camp = sub.add_parser("campaign", help="collection campaigns (campaign.apply/remove/list)",
                          description="Sign and send campaign.apply (the campaign from a TOML "
                                      "or JSON file), campaign.remove or campaign.list; print "
                                      "the statuses like `command`.").add_subparsers(
        dest="campaign_command", metavar="ACTION", required=True)
    for action, help_text in (("apply", "apply the campaign in FILE (.toml or .json)"),
                              ("remove", "remove campaign ID"), ("list", "list campaigns")):
        a = camp.add_parser(action, help=help_text)
        if action == "apply":
            a.add_argument("file", help="campaign document (PROTOCOL.md §8), TOML or JSON")
        elif action == "remove":
            a.add_argument("campaign_id", metavar="ID")
        _connection(a)
        a.add_argument("--key", required=True, help="cloud private key (PKCS#8 PEM)")
        a.add_argument("--ttl", type=_seconds, default=60.0, help="seconds until exp (60)")
        a.add_argument("--id", help="command id (default: a fresh random one)")
        a.add_argument("--pub", help="vehicle public key: verify the responses (recommended)")
        a.add_argument("--timeout", type=_seconds, help="give up after this many s")
        a.set_defaults(func=_campaign, name=f"campaign.{action}", param=[])


def _campaign(args) -> int:
    if args.campaign_command == "apply":
        args.params = {"campaign": load_campaign(args.file)}
    elif args.campaign_command == "remove":
        args.params = {"id": args.campaign_id}
    else:
        args.params = {}
    return _command(args)


def load_campaign(path: str) -> dict:
    """A campaign from a .toml or .json file: the CAMPAIGN map itself, or {campaign: ...}."""
    from pathlib import Path

    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise AgentError(f"{path}: cannot read: {e}") from None
    try:
        doc = json.loads(text) if p.suffix == ".json" else tomllib.loads(text)
    except (ValueError, tomllib.TOMLDecodeError) as e:
        raise AgentError(f"{path}: not valid {'JSON' if p.suffix == '.json' else 'TOML'}: {e}")
    if isinstance(doc, dict) and set(doc) == {"campaign"}:
        doc = doc["campaign"]
    if not isinstance(doc, dict) or "id" not in doc:
        raise AgentError(f"{path}: expected a campaign map with an `id` (PROTOCOL.md §8)")
    return doc


def _connection(p: argparse.ArgumentParser) -> None:
    p.add_argument("--broker", required=True, metavar="HOST:PORT")
    p.add_argument("--vin", required=True)
    p.add_argument("--prefix", help="topic prefix (default vehicles/{vin})")
    p.add_argument("--tls-ca", help="CA that signed the broker's certificate (enables TLS)")
    p.add_argument("--tls-cert", help="client certificate (mutual TLS)")
    p.add_argument("--tls-key", help="client key (mutual TLS)")
    p.add_argument("--mqtt", choices=("auto", "5", "3.1.1"), default="auto",
                   help="MQTT version (auto: 5, and 3.1.1 when the broker refuses or drops 5)")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except AgentError as e:
        if args.debug:
            raise
        print(f"tcu-cloud: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


# -- keys -------------------------------------------------------------------------------

def _keys_generate(args) -> int:
    from ..adapters.keys import generate_keypair

    private, public, kid = generate_keypair(args.dir, force=args.force, stem=args.stem, alg=args.alg)
    print(kid)
    print(f"wrote {private} and {public}; add the public key to each vehicle's trust store",
          file=sys.stderr)
    return 0


# -- command ----------------------------------------------------------------------------

def _command(args) -> int:
    from ..adapters.keys import load_private_key, load_public_key
    from ..core.cose import Signer, kid_of, verify
    from .client import connect

    signer = Signer(load_private_key(_existing_key(args.key)))
    if getattr(args, "grant", None):  # tcu-cloud campaign shares this path, without --grant
        from .grant import command_signer
        signer = command_signer(load_private_key(args.key), args.grant)
    vehicle = {}
    if args.pub:
        key = load_public_key(args.pub)
        vehicle = {kid_of(key): key}
    params = getattr(args, "params", None) or dict(_param(p) for p in args.param)
    now = int(time.time() * 1000)
    cid = args.id or f"c-{uuid.uuid4().hex[:20]}"
    payload = {"v": 1, "id": cid, "vin": args.vin, "name": args.name, "params": params,
               "iat": now, "exp": now + int(args.ttl * 1000)}
    prefix = args.prefix or f"vehicles/{args.vin}"
    done = threading.Event()
    outcome = {"status": None, "sent": None, "ours": False, "vehicle": {}}

    def on_message(topic: str, data: bytes) -> None:
        if topic.endswith("/status"):  # the retained record: does this vehicle exist, online?
            outcome["vehicle"] = _vehicle_status(data)
            seen.set()
            return
        if vehicle:
            try:
                body = verify(data, vehicle).payload
            except AgentError as e:
                print(json.dumps({"error": "bad signature on response", "detail": str(e)}),
                      flush=True)
                return
        else:
            from ..core.cose import decode_unverified
            body = decode_unverified(data)[2]
        if body.get("id") is None and _likely_ours(body, outcome):
            print(json.dumps({**body, "verified": bool(vehicle), "note": NULL_ID_NOTE},
                             default=str), flush=True)
            print(f"tcu-cloud: REJECTED {body.get('reason')} with no id, "
                  f"{time.monotonic() - outcome['sent']:.1f} s after our publish: most likely "
                  f"the answer to this command{_HINTS.get(body.get('reason'), '')}",
                  file=sys.stderr)
            outcome["status"] = "REJECTED"
            done.set()
            return
        if body.get("id") != cid:
            return
        outcome["ours"] = True
        print(json.dumps({**body, "verified": bool(vehicle)}, default=str), flush=True)
        if body.get("status") in TERMINAL:
            outcome["status"] = body["status"]
            done.set()

    seen = threading.Event()
    client = connect(args, [f"{prefix}/responses", f"{prefix}/status"], on_message)
    try:
        never = f"no vehicle status was ever seen on {prefix}/status"
        if not seen.wait(RETAINED_WAIT_S):
            print(f"tcu-cloud: {never}: no vehicle with this VIN has connected to this broker "
                  "(sending anyway)", file=sys.stderr)
        elif outcome["vehicle"].get("online") is False:
            print(f"tcu-cloud: the vehicle is offline (its retained status on {prefix}/status "
                  "says online: false); the command waits for it", file=sys.stderr)
        outcome["sent"] = time.monotonic()  # before: the answer can beat the PUBACK
        client.publish(f"{prefix}/commands", signer.sign(payload))
        if not done.wait(args.timeout if args.timeout is not None else args.ttl + 10):
            why = "no terminal status before the timeout" if seen.is_set() else never
            print(json.dumps({"id": cid, "error": why}))
    finally:
        client.close()
    return 0 if outcome["status"] == "SUCCEEDED" else 1


RETAINED_WAIT_S = 1.0  # a broker sends the retained status right after the subscription


def _vehicle_status(data: bytes) -> dict:
    from ..core.cose import decode_unverified
    try:
        body = decode_unverified(data)[2]
    except Exception:  # not ours to judge here: it exists, that is what matters
        return {}
    return body if isinstance(body, dict) else {}


NULL_ID_NOTE = ("carries no id (the vehicle could not verify the command); taken as the answer "
                "to this command since it came right after it")
_HINTS = {"UNKNOWN_KEY": "; is this key's .pub in the vehicle's trust store?",
          "BAD_ENVELOPE": "; the vehicle could not parse it"}


def _likely_ours(body: dict, outcome: dict) -> bool:
    """A null-id REJECTED soon after our publish, before any status for our id."""
    sent = outcome["sent"]
    return (body.get("status") == "REJECTED" and sent is not None and not outcome["ours"]
            and outcome["status"] is None and time.monotonic() - sent <= NULL_ID_WINDOW_S)


def _existing_key(path: str) -> str:
    """The agent's key loader suggests `tcu-agent keys generate`; here the tool is ours."""
    from pathlib import Path

    p = Path(path)
    if not p.exists():
        stem = "" if p.stem == "cloud" else f" --stem {p.stem}"
        raise AgentError(f"cloud key {path} not found; create one with "
                         f"`tcu-cloud keys generate --dir {p.parent}{stem}`")
    return path


def _param(text: str):
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise AgentError(f"--param {text!r}: expected K=V")
    try:
        return key, tomllib.loads(f"v = {value}")["v"]
    except tomllib.TOMLDecodeError:
        return key, value


# -- listen -----------------------------------------------------------------------------

def _listen(args) -> int:
    from ..adapters.keys import load_public_key
    from ..core.cose import kid_of, verify
    from ..errors import VerificationError
    from .client import connect

    key = load_public_key(args.pub)
    keys = {kid_of(key): key}
    prefix = args.prefix or f"vehicles/{args.vin}"
    state = {"count": 0, "last_seq": None, "bad": 0}
    lock = threading.Lock()
    done = threading.Event()

    def on_message(topic: str, data: bytes) -> None:
        kind = topic.rsplit("/", 1)[-1]
        if kind == "commands":
            return
        with lock:
            if done.is_set():
                return  # --count reached; the client is closing
            try:
                body = verify(data, keys).payload
            except VerificationError as e:
                state["bad"] += 1
                state["count"] += 1
                print(json.dumps({"topic": topic, "verified": False, "error": e.reason,
                                  "detail": str(e)}), flush=True)
                if args.count and state["count"] >= args.count:
                    done.set()
                return
            line = {"topic": topic, "kind": kind, "verified": True, "payload": body}
            if kind == "telemetry":
                seq, last = body.get("seq"), state["last_seq"]
                if last is not None and isinstance(seq, int):
                    if seq > last + 1:
                        line["gap"] = list(range(last + 1, min(seq, last + 101)))
                    elif seq <= last:
                        line["duplicate"] = True
                if isinstance(seq, int) and (last is None or seq > last):
                    state["last_seq"] = seq
            print(json.dumps(line, default=str), flush=True)
            state["count"] += 1
            if args.count and state["count"] >= args.count:
                done.set()

    client = connect(args, [f"{prefix}/#"], on_message)
    try:
        done.wait(args.duration)
    finally:
        client.close()
    return 1 if state["bad"] else 0


if __name__ == "__main__":
    sys.exit(main())
