"""adapters/tuf.py against a real TUF repository (cloud/repo.py) on a loopback HTTP server.

No mocks: every failure is produced by changing the repository or the server the way an
attacker, a broken network or a full disk would.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import uuid
from pathlib import Path

import pytest

from agent.adapters.tuf import FetchConfig, FetchError, fetch_target
from agent.cloud import repo
from agent.core.protocol import DOWNLOAD_FAILED, VERIFICATION_FAILED
from agent.core.updates import UpdateError, accept_target

HW = "tcu-kona-1"
NO_MARGIN = FetchConfig(free_margin_bytes=0)


@pytest.fixture
def artifact(tmp_path) -> Path:
    path = tmp_path / "fw-1.4.0.bin"
    path.write_bytes(os.urandom(300_000))
    return path


@pytest.fixture
def repository(tmp_path, artifact):
    directory = tmp_path / "repo"
    root = repo.init_repo(directory, expires_days=30)
    repo.add_target(directory, artifact, "1.4.0", HW)
    with repo.serve(directory) as server:
        yield directory, root, server


def fetch(tmp_path, server, root, name="fw-1.4.0.bin", progress=None, config=NO_MARGIN,
          dest=None):
    return fetch_target(server.url, name, root, tmp_path / "cache", dest or tmp_path / "dest",
                        progress, config)


def expect(reason, *args, **kwargs) -> FetchError:
    with pytest.raises(FetchError) as info:
        fetch(*args, **kwargs)
    assert info.value.reason == reason, str(info.value)
    return info.value


def test_happy_download_with_progress(tmp_path, repository, artifact):
    _, root, server = repository
    seen = []
    got = fetch(tmp_path, server, root, progress=seen.append)
    assert got.path == tmp_path / "dest" / "fw-1.4.0.bin"
    assert got.path.read_bytes() == artifact.read_bytes()
    assert got.sha256 == hashlib.sha256(artifact.read_bytes()).hexdigest()
    assert got.length == 300_000
    assert got.custom == {"hardware_id": HW, "version": "1.4.0"}
    assert seen[0] == 0 and seen[-1] == 100 and seen == sorted(set(seen)) and len(seen) > 2
    assert accept_target(got.name, got.custom, HW, "1.3.9") == "1.4.0"
    assert [p for p in (tmp_path / "dest").iterdir() if p.name != "fw-1.4.0.bin"] == []


def test_valid_cached_copy_is_reused(tmp_path, repository):
    directory, root, server = repository
    fetch(tmp_path, server, root)
    (directory / "targets" / "fw-1.4.0.bin").unlink()  # the server could not serve it now
    again = fetch(tmp_path, server, root)
    assert again.path.stat().st_size == 300_000
    assert server.requests.count("/targets/fw-1.4.0.bin") == 1


def test_tampered_artifact_same_length(tmp_path, repository):
    directory, root, server = repository
    served = directory / "targets" / "fw-1.4.0.bin"
    data = bytearray(served.read_bytes())
    data[1000] ^= 1
    served.write_bytes(bytes(data))
    err = expect(VERIFICATION_FAILED, tmp_path, server, root)
    assert "hash" in str(err).lower()
    assert list((tmp_path / "dest").iterdir()) == []


def test_tampered_artifact_longer(tmp_path, repository):
    directory, root, server = repository
    with open(directory / "targets" / "fw-1.4.0.bin", "ab") as f:
        f.write(b"trojan")
    expect(VERIFICATION_FAILED, tmp_path, server, root)
    assert list((tmp_path / "dest").iterdir()) == []


def test_expired_timestamp(tmp_path, repository):
    directory, root, server = repository
    repo.expire_timestamp(directory)
    err = expect(VERIFICATION_FAILED, tmp_path, server, root)
    assert "expired" in str(err).lower()
    assert "/targets/fw-1.4.0.bin" not in server.requests


def test_metadata_rollback_refused(tmp_path, repository, artifact):
    directory, root, server = repository
    meta = directory / "metadata"
    old = {n: (meta / n).read_bytes() for n in ("timestamp.json", "snapshot.json",
                                                "targets.json")}
    second = tmp_path / "fw-1.5.0.bin"
    second.write_bytes(b"x" * 1000)
    repo.add_target(directory, second, "1.5.0", HW)
    fetch(tmp_path, server, root, name="fw-1.5.0.bin")  # the client has seen the new versions
    for name, data in old.items():  # a mirror replays yesterday's (validly signed) metadata
        (meta / name).write_bytes(data)
    err = expect(VERIFICATION_FAILED, tmp_path, server, root)
    assert "rollback" in str(err).lower()


def test_unsigned_change_to_targets_metadata(tmp_path, repository):
    directory, root, server = repository
    path = directory / "metadata" / "targets.json"
    doc = json.loads(path.read_bytes())
    doc["signed"]["targets"]["fw-1.4.0.bin"]["custom"]["hardware_id"] = "other"
    path.write_text(json.dumps(doc))
    err = expect(VERIFICATION_FAILED, tmp_path, server, root)
    assert "signature" in str(err).lower() or "sign" in str(err).lower()


def test_root_of_another_repository(tmp_path, repository):
    _, _, server = repository
    other = repo.init_repo(tmp_path / "other")
    expect(VERIFICATION_FAILED, tmp_path, server, other)


def test_unknown_target(tmp_path, repository):
    _, root, server = repository
    err = expect(VERIFICATION_FAILED, tmp_path, server, root, name="no-such.bin")
    assert "no-such.bin" in str(err)


def test_older_version_and_other_hardware_are_refused_after_download(tmp_path, repository):
    directory, root, server = repository
    old = tmp_path / "fw-1.2.0.bin"
    old.write_bytes(b"old firmware")
    repo.add_target(directory, old, "1.2.0", HW)
    other = tmp_path / "fw-other.bin"
    other.write_bytes(b"other hardware")
    repo.add_target(directory, other, "9.0.0", "tcu-other-2")

    got = fetch(tmp_path, server, root, name="fw-1.2.0.bin")  # TUF-valid ...
    with pytest.raises(UpdateError) as info:  # ... but a rollback for this vehicle
        accept_target(got.name, got.custom, HW, "1.4.0")
    assert info.value.reason == VERIFICATION_FAILED and "not newer" in info.value.detail

    got = fetch(tmp_path, server, root, name="fw-other.bin")
    with pytest.raises(UpdateError) as info:
        accept_target(got.name, got.custom, HW, "1.4.0")
    assert info.value.reason == VERIFICATION_FAILED and "tcu-other-2" in info.value.detail


def test_server_dies_mid_download(tmp_path, repository, artifact):
    _, root, server = repository
    server.cut_after_bytes = 100_000
    err = expect(DOWNLOAD_FAILED, tmp_path, server, root)
    assert "broke off" in str(err) or "transfer" in str(err)
    assert list((tmp_path / "dest").iterdir()) == []  # no partial file left behind
    server.cut_after_bytes = None  # the network comes back: the retry succeeds
    assert fetch(tmp_path, server, root).path.read_bytes() == artifact.read_bytes()


def test_server_unreachable(tmp_path, repository):
    _, root, _ = repository
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    with pytest.raises(FetchError) as info:
        fetch_target(f"http://127.0.0.1:{port}", "fw-1.4.0.bin", root, tmp_path / "cache",
                     tmp_path / "dest", None, FetchConfig(socket_timeout_s=2))
    assert info.value.reason == DOWNLOAD_FAILED


def test_unreadable_trusted_root(tmp_path, repository):
    _, _, server = repository
    expect(VERIFICATION_FAILED, tmp_path, server, tmp_path / "missing-root.json")


@pytest.fixture
def tiny_fs(tmp_path):
    """A 1 MiB tmpfs (needs root and mount permission; skipped otherwise)."""
    mountpoint = tmp_path / "tiny"
    mountpoint.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mountpoint)],
                          capture_output=True, check=False)
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs: {done.stderr.decode().strip()}")
    yield mountpoint
    subprocess.run(["umount", "-l", str(mountpoint)], check=False)


def test_not_enough_space_is_refused_before_downloading(tmp_path, repository, tiny_fs):
    directory, root, server = repository
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(600_000))  # needs 2 x 600 kB spool + copy > 1 MiB
    repo.add_target(directory, big, "2.0.0", HW)
    err = expect(DOWNLOAD_FAILED, tmp_path, server, root, name="big.bin", dest=tiny_fs)
    assert "not enough space" in str(err)
    assert "/targets/big.bin" not in server.requests


def test_disk_fills_up_during_download(tmp_path, repository, tiny_fs):
    _, root, server = repository
    filler = tiny_fs / f"filler-{uuid.uuid4().hex}"

    def fill_the_disk(percent: int) -> None:  # someone else eats the space mid-download
        if not filler.exists():
            with open(filler, "wb") as f:
                try:
                    while True:
                        f.write(b"\0" * 4096)
                        f.flush()
                except OSError:
                    pass

    err = expect(DOWNLOAD_FAILED, tmp_path, server, root, progress=fill_the_disk, dest=tiny_fs)
    assert "space" in str(err).lower() or "storage" in str(err).lower()
    assert [p.name for p in tiny_fs.iterdir()] == [filler.name]


def test_truncated_file_on_the_server_is_a_download_failure(tmp_path, repository):
    """Fewer bytes than signed is what a dying transfer looks like: retryable, not an attack."""
    directory, root, server = repository
    served = directory / "targets" / "fw-1.4.0.bin"
    served.write_bytes(served.read_bytes()[:123_456])
    err = expect(DOWNLOAD_FAILED, tmp_path, server, root)
    assert "123456 of 300000" in str(err)
    assert list((tmp_path / "dest").iterdir()) == []


def test_cancel_during_download(tmp_path, repository):
    _, root, server = repository
    seen = []
    with pytest.raises(FetchError) as info:
        fetch_target(server.url, "fw-1.4.0.bin", root, tmp_path / "cache", tmp_path / "dest",
                     seen.append, FetchConfig(free_margin_bytes=0, chunk_bytes=16_384),
                     cancelled=lambda: bool(seen) and seen[-1] > 0)
    assert info.value.reason == "CANCELLED"
    assert 0 < seen[-1] < 100
    assert list((tmp_path / "dest").iterdir()) == []


def test_disk_fills_up_while_moving_the_verified_file_into_place(tmp_path, repository,
                                                                  tiny_fs):
    """The spool completes and verifies, then the copy into dest_dir hits ENOSPC: nothing of
    the half-written copy may stay behind."""
    _, root, server = repository
    filler = tiny_fs / "filler"
    chunk = 16_384

    def fill_leaving_room_for_the_last_chunk(percent: int) -> None:
        if percent == 100 and not filler.exists():
            with open(filler, "wb") as f:
                while shutil.disk_usage(tiny_fs).free > chunk + 8192:
                    f.write(b"\0" * 4096)
                    f.flush()

    err = expect(DOWNLOAD_FAILED, tmp_path, server, root, dest=tiny_fs,
                 progress=fill_leaving_room_for_the_last_chunk,
                 config=FetchConfig(free_margin_bytes=0, chunk_bytes=chunk))
    assert "storage" in str(err) and "No space" in str(err)
    assert [p.name for p in tiny_fs.iterdir()] == ["filler"]
