"""Files installed with the package: the demo config, its DBC and the example configs.

They live in the checkout's configs/ and dbc/; agent/data/ links to both, and the wheel carries
them as package data, so `tcu-agent demo` and `simulate` work from any directory.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from .errors import ConfigError


def data_file(*parts: str) -> Path:
    """A packaged data file as a path (the configs' relative paths need a real directory)."""
    path = Path(str(files("agent").joinpath("data", *parts)))
    if not path.is_file():
        raise ConfigError(f"{path}: missing from the installed package (reinstall tcu-agent)")
    return path


def demo_dbc() -> Path:
    return data_file("dbc", "demo_ev.dbc")


def demo_config() -> Path:
    return data_file("configs", "demo.toml")
