"""The trust store as a TUF target (`trust.refresh`): the family and the target checks. Sans-I/O.

    trust.refresh  { repository: http(s) URL of a TUF repository, target: tstr }

The target is a trust store TOML file (every public key inline) listed in the repository's
signed targets metadata with custom fields:

    {"trust_version": uint >= 1, ? "vins": [tstr, ...], ? "hardware_ids": [tstr, ...]}

accept_trust_target() decides from those signed fields alone, before the file is fetched:
- trust_version lower than the installed one: a rollback, VERIFICATION_FAILED;
- the same version: nothing to do (a periodic refresh that found no news);
- `vins` / `hardware_ids`, when present, must name this vehicle / its hardware id.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from agent.errors import ParamError, UpdateError

from .protocol import VERIFICATION_FAILED
from .registry import Family, show
from .updates import _is_http_url

REFRESH = "trust.refresh"
_MAX_TARGET = 255
_MAX_SCOPE = 10_000  # entries in vins / hardware_ids


def check_trust_params(name: str, params: Mapping) -> None:
    """Parameters of trust.refresh; raises ParamError (BAD_PARAMS)."""
    extra = sorted(set(params) - {"repository", "target"})
    if extra:
        raise ParamError(f"{name} takes no parameter {show(extra[0])}")
    for key in ("repository", "target"):
        if key not in params:
            raise ParamError(f"{name} needs parameter {key!r}")
    target = params["target"]
    if type(target) is not str or not 0 < len(target) <= _MAX_TARGET or not target.isprintable():
        raise ParamError(f"target: must be 1-{_MAX_TARGET} printable characters")
    if not _is_http_url(params["repository"]):
        raise ParamError("repository: must be an http:// or https:// URL with a host and no "
                         "query or fragment")


FAMILY = Family("trust", frozenset({REFRESH}), check_trust_params)


def accept_trust_target(target: str, custom: Any, installed_version: int, vin: str,
                        hardware_id: str | None) -> int | None:
    """The target's trust_version if it should be installed, None if it is the installed one.
    Raises UpdateError(VERIFICATION_FAILED) for a target this vehicle must not install."""
    def refuse(why: str) -> UpdateError:
        return UpdateError(VERIFICATION_FAILED, f"trust store target {target!r}: {why}")

    if not isinstance(custom, Mapping):
        raise refuse("no custom metadata")
    version = custom.get("trust_version")
    if type(version) is not int or version < 1:
        raise refuse("custom field trust_version missing or not an integer >= 1")
    for key, mine, what in (("vins", vin, "vehicle"), ("hardware_ids", hardware_id, "hardware")):
        if key not in custom:
            continue
        scope = custom[key]
        if (not isinstance(scope, list) or len(scope) > _MAX_SCOPE
                or not all(type(x) is str for x in scope)):
            raise refuse(f"custom field {key} must be a list of strings")
        if mine is None or mine not in scope:
            raise refuse(f"not for this {what} ({key} does not list {show(mine)})")
    if version < installed_version:
        raise refuse(f"version {version} is older than the installed version "
                     f"{installed_version} (rollback refused)")
    return None if version == installed_version else version
