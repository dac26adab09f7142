"""The files the agent's MQTT settings name -- TLS material and the password -- read and
checked when the uplink is built (a bad file stops the start), without importing paho."""

from __future__ import annotations

import ssl
from pathlib import Path

from agent.config import TlsConfig
from agent.errors import UplinkError


def tls_context(tls: TlsConfig) -> ssl.SSLContext | None:
    if tls.ca is None:
        return None
    try:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(tls.ca))
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        if tls.cert is not None:
            ctx.load_cert_chain(str(tls.cert), str(tls.key) if tls.key else None)
    except (OSError, ssl.SSLError, ValueError) as e:
        raise UplinkError(f"mqtt.tls: cannot load the CA/certificate/key: {describe(e)}") \
            from None
    return ctx


def read_password(path: Path | None) -> str | None:
    if path is None:
        return None
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UplinkError(f"mqtt.password_file: cannot read {path}: {e}") from None
    return lines[0] if lines else ""


def describe(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"
