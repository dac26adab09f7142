"""Rental grants on the cloud side (PROTOCOL.md §11): the backend signs a grant for a driver's
key; the driver's phone signs ordinary commands that carry it in their protected header.

    tcu-cloud grant --key backend.key --vin VIN --driver-pub phone.pub --rental R1 \
        --allow 'doors.*' --allow immobilizer.off --allow rental.end --valid 2h [--out FILE]
    tcu-cloud command --grant FILE --key phone.key --vin VIN --name doors.unlock ...
"""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path
from typing import Any

import cbor2

from ..core import cose
from ..errors import AgentError

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhd]?)$")
_UNIT_S = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def duration_ms(text: str) -> int:
    """'90', '90s', '15m', '2h', '1d' -> milliseconds; AgentError otherwise."""
    m = _DURATION.match(text.strip())
    if not m or float(m.group(1)) <= 0:
        raise AgentError(f"--valid {text!r}: expected a duration like 90s, 15m, 2h or 1d")
    return int(float(m.group(1)) * _UNIT_S[m.group(2)] * 1000)


def make_grant(signer: cose.Signer, vin: str, rental: str, driver_key: cose.PublicKey,
               allow: list[str], nbf_ms: int, exp_ms: int) -> bytes:
    """The grant: a COSE_Sign1 by the backend's key (which the vehicle must trust with
    `rental.grant`)."""
    return signer.sign({"v": 1, "vin": vin, "rental": rental,
                        "key": cose.public_bytes(driver_key), "allow": list(allow),
                        "nbf": nbf_ms, "exp": exp_ms}, compress=False)


class GrantSigner:
    """Signs command payloads with a driver's key, the grant in the protected header.
    Same interface as cose.Signer.sign."""

    def __init__(self, key: Any, grant: bytes):
        self._key = key if isinstance(key, cose.SigningKey) else cose.software_key(key)
        self.kid = cose.kid_of(self._key.public_key)
        self.protected = cbor2.dumps({1: self._key.alg, 4: self.kid, 3: cose.CT_CBOR,
                                      "grant": grant}, canonical=True)

    def sign(self, payload: dict, compress: bool | None = None) -> bytes:
        body = cbor2.dumps(payload, canonical=True)
        to_sign = cbor2.dumps(["Signature1", self.protected, b"", body])
        signature = self._key.sign(to_sign)
        return cbor2.dumps(cbor2.CBORTag(18, [self.protected, {}, body, signature]))


# -- the CLI ------------------------------------------------------------------------------

def add_parser(sub) -> None:
    g = sub.add_parser("grant", help="sign a rental grant for a driver's key",
                       description="Write a grant (PROTOCOL.md §11): the driver's key may send "
                                   "the --allow commands to this vehicle from --nbf for --valid. "
                                   "--key must be in the vehicle's trust store with "
                                   "rental.grant (and every --allow) in its allow.")
    g.add_argument("--key", required=True, help="backend private key (PKCS#8 PEM)")
    g.add_argument("--vin", required=True)
    g.add_argument("--driver-pub", required=True, help="the driver's public key (PEM)")
    g.add_argument("--rental", required=True, help="rental id (1-64 of A-Za-z0-9._:-)")
    g.add_argument("--allow", action="append", required=True, metavar="PATTERN",
                   help="command pattern the driver may use, e.g. 'doors.*'; repeatable")
    g.add_argument("--valid", default="2h", help="validity from nbf: 90s, 15m, 2h, 1d (2h)")
    g.add_argument("--nbf", type=int, help="start, ms since the epoch (default: now)")
    g.add_argument("--out", help="write the grant here (default: RENTAL.grant)")
    g.set_defaults(func=_grant)


def _grant(args) -> int:
    from ..adapters.keys import load_private_key, load_public_key

    signer = cose.Signer(load_private_key(args.key))
    driver = load_public_key(args.driver_pub)
    nbf = args.nbf if args.nbf is not None else int(time.time() * 1000)
    exp = nbf + duration_ms(args.valid)
    grant = make_grant(signer, args.vin, args.rental, driver, args.allow, nbf, exp)
    out = Path(args.out or f"{args.rental}.grant")
    out.write_bytes(grant)
    print(f"wrote {out}: rental {args.rental} for kid {cose.kid_of(driver).hex()} on "
          f"{args.vin}, {', '.join(args.allow)}, until {exp}", file=sys.stderr)
    return 0


def command_signer(key: Any, grant_file: str) -> GrantSigner:
    try:
        grant = Path(grant_file).read_bytes()
    except OSError as e:
        raise AgentError(f"--grant {grant_file}: {e.strerror or e}") from None
    return GrantSigner(key, grant)
