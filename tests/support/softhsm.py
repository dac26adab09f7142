"""A SoftHSM2 token for tests, in its own directory (SOFTHSM2_CONF), never the system's.

The PKCS#11 module reads SOFTHSM2_CONF once, when a process first loads it, and sees only the
tokens that exist then: in-process tests share one token directory per test process
(`shared_token`), subprocess tests make their own (`make_token`).
"""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

MODULE_CANDIDATES = ("/usr/lib/softhsm/libsofthsm2.so",
                     "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
                     "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so")
USER_PIN, SO_PIN = "4711-tcu", "so-0815"
_shared: dict | None = None


def module() -> Path:
    for candidate in MODULE_CANDIDATES:
        if os.path.isfile(candidate):
            return Path(candidate)
    raise AssertionError("libsofthsm2.so not found: run .ci/install-system-deps (softhsm2)")


def make_token(directory: Path, labels=("tcu",)) -> dict:
    """Initialise tokens under directory; returns env (SOFTHSM2_CONF), module, pin_file."""
    tokens = directory / "tokens"
    tokens.mkdir(parents=True, exist_ok=True)
    conf = directory / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {tokens}\nobjectstore.backend = file\n"
                    "log.level = ERROR\nslots.removable = false\n")
    env = dict(os.environ, SOFTHSM2_CONF=str(conf))
    util = shutil.which("softhsm2-util")
    assert util, "softhsm2-util not found: run .ci/install-system-deps (softhsm2)"
    for label in labels:
        subprocess.run([util, "--init-token", "--free", "--label", label, "--pin", USER_PIN,
                        "--so-pin", SO_PIN], env=env, check=True, capture_output=True)
    pin_file = directory / "token.pin"
    pin_file.write_text(USER_PIN + "\n")
    os.chmod(pin_file, 0o600)
    return {"env": env, "conf": conf, "module": module(), "pin_file": pin_file,
            "pin": USER_PIN, "tokens": tokens}


def shared_token() -> dict:
    """One token directory for this test process (tokens "tcu" and "spare"); sets
    SOFTHSM2_CONF in os.environ before the module is first loaded here."""
    global _shared
    if _shared is None:
        directory = Path(tempfile.mkdtemp(prefix="softhsm-"))
        atexit.register(shutil.rmtree, directory, True)
        _shared = make_token(directory, labels=("tcu", "spare"))
        os.environ["SOFTHSM2_CONF"] = str(_shared["conf"])
    return _shared
