"""`tcu-agent keys generate --dir DIR [--alg eddsa|es256]`: the vehicle's signing key."""

from __future__ import annotations


def add_parser(sub, common) -> None:
    p = sub.add_parser("keys", help="manage the vehicle's signing key",
                       description="Manage the vehicle's signing key (Ed25519 or P-256).")
    ksub = p.add_subparsers(dest="keys_command", metavar="ACTION")
    ksub.required = True
    g = ksub.add_parser("generate", help="create vehicle.key (0600) and vehicle.pub",
                        description="Write DIR/vehicle.key (PKCS#8 PEM, mode 0600) and "
                                    "DIR/vehicle.pub (SubjectPublicKeyInfo PEM); print the kid.")
    g.add_argument("--dir", required=True, help="directory for the key pair (created 0700)")
    g.add_argument("--force", action="store_true", help="overwrite an existing key")
    g.add_argument("--alg", choices=("eddsa", "es256"), default="eddsa",
                   help="eddsa: Ed25519 (default); es256: ECDSA P-256, for secure elements "
                        "and TPMs without Ed25519")
    common(g)
    g.set_defaults(func=run_generate)


def run_generate(args) -> int:
    from ..adapters.keys import generate_keypair

    private, public, kid = generate_keypair(args.dir, force=args.force, alg=args.alg)
    print(kid)
    import sys
    print(f"wrote {private} (keep it secret) and {public} (give it to the cloud)", file=sys.stderr)
    return 0
