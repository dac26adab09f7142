"""Fetching an update artifact from a TUF repository with python-tuf's ngclient.

`fetch_target(repository_url, target_name, trusted_root, cache_dir, dest_dir, progress)`
refreshes the metadata (root -> timestamp -> snapshot -> targets, every signature, version
and expiry checked by ngclient), looks the target up, checks free space, downloads it with
ngclient's length and hash checks and moves it into `dest_dir` durably. Every failure comes
out as `FetchError` with a §7 reason:

  DOWNLOAD_FAILED      network, HTTP errors, timeouts, the server dying mid-transfer
                       (fewer bytes than the signed length), not enough space, disk full
  CANCELLED            the caller's `cancelled()` turned true during the download
  VERIFICATION_FAILED  bad signatures, expired metadata, metadata rollback, a malformed
                       repository, hash or length mismatch, a target the repository does not
                       list, an unreadable trusted root

Choices:
- The metadata cache is `cache_dir` as given: one cache per trust root. Every mirror of the
  repository shares it, so rollback protection holds whatever URL a command names.
- The trusted root is passed to ngclient as `bootstrap` on every call (the vehicle's root
  of trust is the file, not the cache); newer roots found in the cache are still used.
- ngclient spools a download in the system temp dir (often a RAM tmpfs on a vehicle); our
  fetcher spools in `dest_dir` instead, so the space check covers both copies:
  free >= 2 x length + margin.
- A short transfer (fewer bytes than signed) is DOWNLOAD_FAILED even when the server sent no
  Content-Length: it is what a dying connection looks like. More bytes than signed, or the
  right length with the wrong hash, is VERIFICATION_FAILED.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any
from urllib.parse import quote

from tuf.api import exceptions as tuf_errors
from tuf.ngclient import FetcherInterface, Updater, UpdaterConfig
from tuf.ngclient.urllib3_fetcher import Urllib3Fetcher

from agent.core.protocol import CANCELLED, DOWNLOAD_FAILED, VERIFICATION_FAILED
from agent.errors import FetchError, UpdateError

from .atomic import fsync_dir


@dataclass(frozen=True, slots=True)
class FetchConfig:
    socket_timeout_s: float = 30.0        # connect timeout and longest gap between bytes
    chunk_bytes: int = 64 * 1024          # read size; progress granularity
    free_margin_bytes: int = 16 << 20     # left free on dest_dir's filesystem after download
    max_target_bytes: int = 4 << 30       # refuse bigger targets outright
    app_user_agent: str | None = "tcu-agent"


@dataclass(frozen=True, slots=True)
class FetchedTarget:
    """A downloaded, verified target: `path` in dest_dir and what the signed metadata says."""

    path: Path
    name: str
    length: int
    sha256: str
    custom: dict[str, Any] = field(default_factory=dict)


class _Cancelled(tuf_errors.DownloadError):
    """Raised inside the fetcher; a DownloadError so that ngclient lets it through as is."""


class ProgressFetcher(FetcherInterface):
    """ngclient fetcher over urllib3 that counts the bytes of the target download, reports
    progress in percent and spools into a directory of our choosing."""

    def __init__(self, config: FetchConfig, spool_dir: Path,
                 cancelled: Callable[[], bool] | None = None):
        self._http = Urllib3Fetcher(socket_timeout=config.socket_timeout_s,
                                    chunk_size=config.chunk_bytes,
                                    app_user_agent=config.app_user_agent)
        self._spool_dir = spool_dir
        self._cancelled = cancelled
        self._total: int | None = None
        self._progress: Callable[[int], None] | None = None
        self._last_percent = -1
        self.received = 0

    def track(self, total: int, progress: Callable[[int], None] | None) -> None:
        """Count the next download (the target) against `total` bytes."""
        self._total, self._progress, self._last_percent, self.received = total, progress, -1, 0
        self._report(0)

    def _fetch(self, url: str) -> Iterator[bytes]:
        chunks = self._http.fetch(url)  # connection and HTTP status errors raise here
        return self._count(url, chunks)

    def _count(self, url: str, chunks: Iterator[bytes]) -> Iterator[bytes]:
        try:
            for chunk in chunks:
                if self._cancelled is not None and self._cancelled():
                    raise _Cancelled(f"download of {url} cancelled after {self.received} bytes")
                if self._total is not None:
                    self.received += len(chunk)
                    self._report(min(100, self.received * 100 // max(self._total, 1)))
                yield chunk
        except tuf_errors.DownloadError:
            raise
        except Exception as e:  # urllib3 ProtocolError (IncompleteRead), resets, ...
            raise tuf_errors.DownloadError(
                f"transfer of {url} broke off after {self.received} bytes: {e}") from e

    def _report(self, percent: int) -> None:
        if self._progress is not None and percent != self._last_percent:
            self._last_percent = percent
            self._progress(percent)

    @contextlib.contextmanager
    def download_file(self, url: str, max_length: int) -> Iterator[IO]:
        # As FetcherInterface.download_file, but spooled in spool_dir, not the system tmp.
        received = 0
        with tempfile.TemporaryFile(dir=self._spool_dir) as spool:
            for chunk in self.fetch(url):
                received += len(chunk)
                if received > max_length:
                    raise tuf_errors.DownloadLengthMismatchError(
                        f"{url}: more than the {max_length} bytes allowed")
                spool.write(chunk)
            spool.seek(0)
            yield spool


def fetch_target(repository_url: str, target_name: str, trusted_root: Path, cache_dir: Path,
                 dest_dir: Path, progress: Callable[[int], None] | None = None,
                 config: FetchConfig = FetchConfig(),
                 cancelled: Callable[[], bool] | None = None,
                 accept: Callable[[str, dict], Any] | None = None,
                 reference_ms: int | None = None) -> FetchedTarget:
    """Download and verify `target_name` from the TUF repository at `repository_url`.

    Metadata comes from `{repository_url}/metadata/`, the target from
    `{repository_url}/targets/`; metadata is cached in `cache_dir`. `progress(percent)` is
    called as the target's bytes arrive (0..100, each value once). `cancelled()` (e.g. a
    threading.Event's is_set) is polled between chunks; when it turns true the download stops
    with FetchError(CANCELLED). An already downloaded, still valid copy in `dest_dir` is
    reused. `accept(name, custom)` sees the signed custom fields before a byte of the target
    is fetched and refuses it by raising UpdateError (hardware id, anti-rollback: no bandwidth
    is spent on a target this vehicle would not install). Returns a FetchedTarget; a partial
    download never stays in `dest_dir`.

    `reference_ms`: the time expiry is checked against when it is later than the system clock
    (the agent's time floor, core/clock.py: a clock behind it must not make expired metadata
    valid again).

    Raises FetchError(DOWNLOAD_FAILED | VERIFICATION_FAILED | CANCELLED), or what accept()
    raised; nothing else.
    """
    base = repository_url.rstrip("/")
    stage = "metadata"
    partial: Path | None = None
    fetcher: ProgressFetcher | None = None
    info = None
    try:
        try:
            root_bytes = Path(trusted_root).read_bytes()
        except OSError as e:
            raise FetchError(VERIFICATION_FAILED,
                             f"trusted TUF root {trusted_root} unreadable: {e}") from e
        cache_dir, dest_dir = Path(cache_dir), Path(dest_dir)
        cache_dir.mkdir(parents=True, exist_ok=True)
        dest_dir.mkdir(parents=True, exist_ok=True)
        fetcher = ProgressFetcher(config, dest_dir, cancelled)
        updater = Updater(str(cache_dir), f"{base}/metadata/", str(dest_dir), f"{base}/targets/",
                          fetcher=fetcher, config=UpdaterConfig(), bootstrap=root_bytes)
        if reference_ms is not None:
            _raise_reference_time(updater, reference_ms)
        updater.refresh()
        info = updater.get_targetinfo(target_name)
        if info is None:
            raise FetchError(VERIFICATION_FAILED,
                             f"target {target_name!r} is not in the repository {base}")
        sha256 = info.hashes.get("sha256")
        if not sha256:
            raise FetchError(VERIFICATION_FAILED, f"target {target_name!r} has no sha256 hash")
        if info.length > config.max_target_bytes:
            raise FetchError(VERIFICATION_FAILED,
                             f"target {target_name!r} is {info.length} bytes, more than the "
                             f"{config.max_target_bytes} accepted")
        custom = info.custom if isinstance(info.custom, dict) else {}
        if accept is not None:
            accept(target_name, custom)
        if quote(target_name, "") in (".", ".."):
            raise FetchError(VERIFICATION_FAILED, f"target name {target_name!r} not usable")
        final = dest_dir / quote(target_name, "")

        cached = updater.find_cached_target(info, str(final))
        if cached is not None:
            if progress is not None:
                progress(100)
            return FetchedTarget(final, target_name, info.length, sha256, dict(custom))

        stage = "target"
        free = shutil.disk_usage(dest_dir).free
        need = 2 * info.length + config.free_margin_bytes
        if free < need:
            raise FetchError(DOWNLOAD_FAILED,
                             f"not enough space in {dest_dir}: {free} bytes free, {need} needed "
                             f"for {target_name!r} ({info.length} bytes)")
        partial = dest_dir / f".{quote(target_name, '')}.partial"
        fetcher.track(info.length, progress)
        updater.download_target(info, str(partial))
        with open(partial, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(partial, final)
        partial = None
        fsync_dir(dest_dir)
        return FetchedTarget(final, target_name, info.length, sha256, dict(custom))
    except FetchError:
        raise
    except UpdateError:  # refused by accept(): passed on as it is
        raise
    except _Cancelled as e:
        raise FetchError(CANCELLED, str(e)) from e
    except tuf_errors.DownloadLengthMismatchError as e:
        raise FetchError(VERIFICATION_FAILED, f"{stage}: {e}") from e
    except tuf_errors.DownloadHTTPError as e:
        raise FetchError(DOWNLOAD_FAILED,
                         f"{stage}: HTTP {e.status_code} from {base}") from e
    except tuf_errors.DownloadError as e:
        raise FetchError(DOWNLOAD_FAILED, f"{stage}: {_why(e)}") from e
    except tuf_errors.LengthOrHashMismatchError as e:
        if stage == "target" and fetcher is not None and info is not None \
                and fetcher.received < info.length:
            raise FetchError(DOWNLOAD_FAILED, f"target {target_name!r}: transfer ended after "
                             f"{fetcher.received} of {info.length} bytes") from e
        raise FetchError(VERIFICATION_FAILED, f"{stage}: {e}") from e
    except tuf_errors.ExpiredMetadataError as e:
        raise FetchError(VERIFICATION_FAILED, f"expired TUF metadata: {e}") from e
    except tuf_errors.BadVersionNumberError as e:
        raise FetchError(VERIFICATION_FAILED, f"TUF metadata rollback refused: {e}") from e
    except tuf_errors.UnsignedMetadataError as e:
        raise FetchError(VERIFICATION_FAILED, f"bad TUF metadata signature: {e}") from e
    except tuf_errors.RepositoryError as e:
        raise FetchError(VERIFICATION_FAILED, f"TUF repository invalid: {e}") from e
    except OSError as e:  # disk full, permissions, cache unwritable
        raise FetchError(DOWNLOAD_FAILED, f"{stage}: local storage: {e}") from e
    except Exception as e:
        raise FetchError(DOWNLOAD_FAILED, f"{stage}: {type(e).__name__}: {e}") from e
    finally:
        if partial is not None:
            partial.unlink(missing_ok=True)


def _raise_reference_time(updater: Updater, reference_ms: int) -> None:
    # ngclient takes no reference time; its trusted set reads `reference_time` at every expiry
    # check (python-tuf 7). Only ever moved later than the system clock, never earlier.
    import datetime

    trusted = getattr(updater, "_trusted_set", None)
    current = getattr(trusted, "reference_time", None)
    if not isinstance(current, datetime.datetime):
        raise FetchError(VERIFICATION_FAILED, "this python-tuf cannot take a reference time")
    wanted = datetime.datetime.fromtimestamp(reference_ms / 1000, datetime.timezone.utc)
    if wanted > current:
        trusted.reference_time = wanted


def _why(e: BaseException) -> str:
    """The message of `e` followed by its causes: ngclient's DownloadError alone says little."""
    parts, seen = [], 0
    while e is not None and seen < 4:
        text = str(e)
        if text and not any(text in p for p in parts):
            parts.append(text)
        e, seen = e.__cause__ or e.__context__, seen + 1
    return ": ".join(parts)[:300]
