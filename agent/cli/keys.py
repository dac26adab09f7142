"""`tcu-agent keys generate`: the vehicle's signing key, in files or in a PKCS#11 token.

    tcu-agent keys generate --dir DIR [--alg eddsa|es256] [--force]
    tcu-agent keys generate --pkcs11 MODULE --token LABEL --key-label LABEL --pin-file FILE
                            [--alg es256|eddsa] [--pub FILE]
"""

from __future__ import annotations

import sys


def add_parser(sub, common) -> None:
    p = sub.add_parser("keys", help="manage the vehicle's signing key",
                       description="Manage the vehicle's signing key (Ed25519 or P-256).")
    ksub = p.add_subparsers(dest="keys_command", metavar="ACTION")
    ksub.required = True
    g = ksub.add_parser("generate", help="create vehicle.key (0600) and vehicle.pub, or a "
                                         "key in a PKCS#11 token",
                        description="Write DIR/vehicle.key (PKCS#8 PEM, mode 0600) and "
                                    "DIR/vehicle.pub (SubjectPublicKeyInfo PEM), or create the "
                                    "key inside a PKCS#11 token (--pkcs11: the private key "
                                    "never leaves it); print the kid, then (token) the public "
                                    "key PEM.")
    where = g.add_mutually_exclusive_group(required=True)
    where.add_argument("--dir", help="directory for the key pair (created 0700)")
    where.add_argument("--pkcs11", metavar="MODULE", help="PKCS#11 module (.so) of the token")
    g.add_argument("--token", help="token label (with --pkcs11)")
    g.add_argument("--key-label", default="vehicle", help="key label in the token (vehicle)")
    g.add_argument("--pin-file", help="file holding the user PIN, mode 0600 (with --pkcs11)")
    g.add_argument("--pub", help="also write the public key PEM here (with --pkcs11)")
    g.add_argument("--force", action="store_true", help="overwrite an existing key (--dir)")
    g.add_argument("--alg", choices=("eddsa", "es256"), default=None,
                   help="eddsa: Ed25519 (default for --dir); es256: ECDSA P-256 (default for "
                        "--pkcs11: secure elements and TPMs often lack Ed25519)")
    common(g)
    g.set_defaults(func=run_generate)

    r = ksub.add_parser("rotate", help="prepare a new key; the agent switches at its next start",
                        description="Write the next key pair beside signing.key_file "
                                    "({stem}.next.key/.pub) and print its kid. At its next start "
                                    "the agent switches to it and announces it in every status "
                                    "record: key {kid, prev, proof}, the proof signed by the old "
                                    "key. Key files only (not [signing] pkcs11).")
    r.add_argument("-c", "--config", required=True, help="agent config file (TOML)")
    r.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    r.add_argument("--alg", choices=("eddsa", "es256"), default=None,
                   help="algorithm of the new key (default: the current key's)")
    r.add_argument("--force", action="store_true", help="replace a prepared next key")
    common(r)
    r.set_defaults(func=run_rotate)


def run_rotate(args) -> int:
    from ..adapters.keys import next_key_paths, prepare_rotation
    from ..config import load_config
    from ..errors import ConfigError

    config = load_config(args.config, args.set)
    if config.signing is None or config.signing.key_file is None:
        raise ConfigError("keys rotate needs [signing] key_file (a token key is rotated in the "
                          "token: generate a new label and change key_label)")
    kid = prepare_rotation(config.signing.key_file, args.alg, force=args.force)
    print(kid)
    print(f"wrote {next_key_paths(config.signing.key_file)[0]}; the agent switches to it at "
          f"its next start (systemctl restart tcu-agent)", file=sys.stderr)
    return 0


def run_generate(args) -> int:
    from ..errors import ConfigError

    if args.pkcs11 is None:
        for name in ("token", "pin_file", "pub"):
            if getattr(args, name):
                raise ConfigError(f"--{name.replace('_', '-')} goes with --pkcs11")
        from ..adapters.keys import generate_keypair

        private, public, kid = generate_keypair(args.dir, force=args.force, alg=args.alg or "eddsa")
        print(kid)
        print(f"wrote {private} (keep it secret) and {public} (give it to the cloud)",
              file=sys.stderr)
        return 0
    return _generate_in_token(args)


def _generate_in_token(args) -> int:
    from pathlib import Path

    from ..adapters.atomic import atomic_write
    from ..adapters.keys import public_pem
    from ..adapters.pkcs11 import generate, read_pin
    from ..errors import ConfigError

    if not args.token or not args.pin_file:
        raise ConfigError("--pkcs11 needs --token and --pin-file")
    if args.force:
        raise ConfigError("--force is not supported with --pkcs11 (delete the key in the token)")
    key = generate(Path(args.pkcs11), args.token, args.key_label, read_pin(Path(args.pin_file)),
                   alg=args.alg or "es256")
    pem = public_pem(key.public_key)
    key.close()
    print(key.kid.hex())
    print(pem.decode(), end="")
    if args.pub:
        atomic_write(Path(args.pub), pem, 0o644)
    print(f"created {args.alg or 'es256'} key {args.key_label!r} in token {args.token!r}; "
          f"configure [signing] pkcs11 = {{ module = \"{args.pkcs11}\", token = \"{args.token}\", "
          f"key_label = \"{args.key_label}\", pin_file = \"{args.pin_file}\" }}", file=sys.stderr)
    return 0
