#!/usr/bin/env python3
"""Signing: COSE_Sign1 messages per second, key in memory vs in a SoftHSM2 token.

For each key (Ed25519 and P-256, each in memory and in a PKCS#11 token created for the run in
a temporary SoftHSM2 directory) it times Signer.sign on the telemetry batches the drain bench
signs (../shared/data/kona_power_on_ready_off.log, every signal, one batch a second; a
synthetic batch without the data), and a bare signature over 200 bytes.
`sign_3600_batches_s` is what signing one hour of batches costs: bench/drain.py signs when it
queues (as the agent does, one batch a second), so a token key changes its queue phase by
that much and its drain phase not at all (the outbox holds signed messages).

    python bench/signing.py [--json] [--seconds S]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey  # noqa: E402

from agent.core.cose import Signer, software_key  # noqa: E402

DATA = ROOT.parent / "shared" / "data"
VIN = "KMHK381GFKU000001"


def batches() -> tuple[list[dict], str]:
    log = DATA / "kona_power_on_ready_off.log"
    if log.is_file():
        from agent.adapters.canlog import read_frames
        from agent.app.assemble import plans_for_dbc, telemetry_core
        from agent.config import TelemetryConfig

        core = telemetry_core(plans_for_dbc([DATA / "kona_ev.dbc"]), TelemetryConfig(messages=("*",)))
        for t, _, key, data in read_frames(log):
            core.feed(0, t + 1_767_225_600, key, data)
        core.flush()
        out = [b.payload(VIN, i + 1, 0) for i, b in enumerate(core.take_batches())]
        if out:
            return out, log.name
    sig = {f"Sig.{i}": [[j * 100, float(j)] for j in range(10)] for i in range(40)}
    return [{"v": 1, "vin": VIN, "seq": 1, "t0": 1_767_225_600_000, "sig": sig}], "synthetic"


def rate(fn, items, seconds: float) -> float:
    n, start = 0, time.perf_counter()
    deadline = start + seconds
    while True:
        for item in items:
            fn(item)
            n += 1
        now = time.perf_counter()
        if now >= deadline:
            return n / (now - start)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--seconds", type=float, default=1.5, help="per measurement (1.5)")
    args = ap.parse_args(argv)

    from support import softhsm

    token = softhsm.shared_token()  # sets SOFTHSM2_CONF before the module is loaded
    from agent.adapters.pkcs11 import generate

    payloads, source = batches()
    keys = {
        "ed25519-memory": software_key(Ed25519PrivateKey.generate()),
        "p256-memory": software_key(ec.generate_private_key(ec.SECP256R1())),
        "ed25519-softhsm2": generate(token["module"], "tcu", "bench-ed", token["pin"], alg="eddsa"),
        "p256-softhsm2": generate(token["module"], "tcu", "bench-p256", token["pin"], alg="es256"),
    }
    blob = [bytes(range(200))]
    results = {}
    for name, key in keys.items():
        signer = Signer(key)
        messages = rate(signer.sign, payloads, args.seconds)
        results[name] = {"messages_per_s": round(messages), "signatures_per_s":
                         round(rate(key.sign, blob, args.seconds)),
                         "sign_3600_batches_s": round(3600 / messages, 3)}
    out = {"payloads": source, "batches": len(payloads),
           "mean_payload_signals": round(sum(len(p["sig"]) for p in payloads) / len(payloads), 1),
           "softhsm2": str(token["module"]), "results": results}
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        print(f"payloads: {source} ({len(payloads)} batches)")
        for name, r in results.items():
            print(f"{name:18} {r['messages_per_s']:>7} messages/s  {r['signatures_per_s']:>7} "
                  f"signatures/s  one hour of batches: {r['sign_3600_batches_s']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
