"""A TUF repository for tests and demos, built with python-tuf's Metadata API.

    DIR/keys/{root,targets,snapshot,timestamp}.pem   Ed25519 private keys (PKCS#8, 0600)
    DIR/metadata/1.root.json root.json targets.json snapshot.json timestamp.json
    DIR/targets/<name>                                the artifacts

consistent_snapshot is off: the client fetches `metadata/<role>.json` (and
`metadata/<N>.root.json` for root versions) and `targets/<name>`. One key per role,
threshold 1. Not a production signing service: keys sit next to the metadata.

`serve()` serves metadata/ and targets/ (never keys/) on 127.0.0.1 only, and can cut a
download short after N bytes to simulate a server dying mid-transfer.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Self

from cryptography.hazmat.primitives.serialization import load_pem_private_key
from securesystemslib.signer import CryptoSigner
from tuf.api.metadata import (
    Metadata,
    MetaFile,
    Root,
    Snapshot,
    TargetFile,
    Targets,
    Timestamp,
)
from tuf.api.serialization.json import JSONSerializer

from ..adapters.atomic import atomic_write
from ..errors import RepoError

ROLES = (Root.type, Targets.type, Snapshot.type, Timestamp.type)
_SERIALIZER = JSONSerializer(compact=False)


def _now() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


def _signer(directory: Path, role: str) -> CryptoSigner:
    path = Path(directory) / "keys" / f"{role}.pem"
    try:
        return CryptoSigner(load_pem_private_key(path.read_bytes(), None))
    except OSError as e:
        raise RepoError(f"{path}: cannot read the {role} key ({e}); run `tcu-cloud repo init`")


def _load(directory: Path, role: str) -> Metadata:
    path = Path(directory) / "metadata" / f"{role}.json"
    try:
        return Metadata.from_bytes(path.read_bytes())
    except OSError as e:
        raise RepoError(f"{path}: cannot read ({e}); run `tcu-cloud repo init`") from e


def _write(directory: Path, md: Metadata, *, versioned: bool = False) -> None:
    data = md.to_bytes(_SERIALIZER)
    meta_dir = Path(directory) / "metadata"
    atomic_write(meta_dir / f"{md.signed.type}.json", data)
    if versioned:
        atomic_write(meta_dir / f"{md.signed.version}.{md.signed.type}.json", data)


def init_repo(directory: Path, expires_days: float = 365) -> Path:
    """Create keys and version-1 metadata for the four top-level roles in `directory`.

    Returns the path of metadata/1.root.json: the trusted root to install on vehicles.
    Raises RepoError if `directory` already holds a repository.
    """
    directory = Path(directory)
    if (directory / "metadata" / "root.json").exists():
        raise RepoError(f"{directory}: already a repository")
    for sub in ("keys", "metadata", "targets"):
        (directory / sub).mkdir(parents=True, exist_ok=True)
    (directory / "keys").chmod(0o700)
    expires = _now() + timedelta(days=expires_days)
    signers = {}
    for role in ROLES:
        signer = CryptoSigner.generate_ed25519()
        atomic_write(directory / "keys" / f"{role}.pem", signer.private_bytes, mode=0o600)
        signers[role] = signer

    root = Root(expires=expires, consistent_snapshot=False)
    for role in ROLES:
        root.add_key(signers[role].public_key, role)
    mds = {Root.type: Metadata(root), Targets.type: Metadata(Targets(expires=expires)),
           Snapshot.type: Metadata(Snapshot(expires=expires)),
           Timestamp.type: Metadata(Timestamp(expires=expires))}
    for role, md in mds.items():
        md.sign(signers[role])
        _write(directory, md, versioned=role == Root.type)
    return directory / "metadata" / "1.root.json"


def resign(directory: Path, role: str, expires: datetime | None = None,
           expires_days: float | None = None, bump: bool = True) -> int:
    """Re-sign `role` (new version unless bump=False; new expiry if given); return its version.

    Re-signing targets or snapshot does NOT update the roles above it: use publish().
    """
    md = _load(directory, role)
    if bump:
        md.signed.version += 1
    if expires_days is not None:
        expires = _now() + timedelta(days=expires_days)
    if expires is not None:
        md.signed.expires = expires
    md.sign(_signer(directory, role))
    _write(directory, md, versioned=role == Root.type)
    return md.signed.version


def publish(directory: Path, expires_days: float = 365) -> None:
    """New snapshot (naming the current targets version) and timestamp, both re-signed."""
    targets = _load(directory, Targets.type)
    snapshot = _load(directory, Snapshot.type)
    snapshot.signed.meta["targets.json"] = MetaFile(version=targets.signed.version)
    snapshot.signed.version += 1
    snapshot.signed.expires = _now() + timedelta(days=expires_days)
    snapshot.sign(_signer(directory, Snapshot.type))
    _write(directory, snapshot)

    timestamp = _load(directory, Timestamp.type)
    timestamp.signed.snapshot_meta = MetaFile(version=snapshot.signed.version)
    timestamp.signed.version += 1
    timestamp.signed.expires = _now() + timedelta(days=expires_days)
    timestamp.sign(_signer(directory, Timestamp.type))
    _write(directory, timestamp)


def add_target(directory: Path, file: Path, version: str, hardware_id: str,
               name: str | None = None, expires_days: float = 365) -> TargetFile:
    """Copy `file` to targets/<name> (default: its file name), list it in targets metadata
    with custom {"hardware_id", "version"}, then bump and re-sign targets, snapshot and
    timestamp. Returns the TargetFile. Raises RepoError for a missing file or repository."""
    directory, file = Path(directory), Path(file)
    name = name or file.name
    if not name or name.startswith("/") or ".." in name.split("/"):
        raise RepoError(f"target name {name!r}: must be a relative path without '..'")
    targets = _load(directory, Targets.type)
    dest = directory / "targets" / name
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(file, dest)
    except OSError as e:
        raise RepoError(f"cannot copy {file} into the repository: {e}") from e
    info = TargetFile.from_file(name, str(dest), ["sha256"])
    info.unrecognized_fields["custom"] = {"hardware_id": hardware_id, "version": version}
    targets.signed.targets[name] = info
    targets.signed.version += 1
    targets.signed.expires = _now() + timedelta(days=expires_days)
    targets.sign(_signer(directory, Targets.type))
    _write(directory, targets)
    publish(directory, expires_days)
    return info


def add_trust_target(directory: Path, file: Path, trust_version: int, name: str = "trust.toml",
                     vins: list[str] | None = None, hardware_ids: list[str] | None = None,
                     expires_days: float = 365) -> TargetFile:
    """Publish a trust store file (every key inline) as target `name` with the signed custom
    fields {"trust_version", ? "vins", ? "hardware_ids"} that vehicles check (core/trust.py)."""
    if type(trust_version) is not int or trust_version < 1:
        raise RepoError(f"trust version {trust_version!r}: must be an integer >= 1")
    info = add_target(directory, file, str(trust_version), "-", name=name,
                      expires_days=expires_days)
    custom: dict[str, Any] = {"trust_version": trust_version}
    if vins:
        custom["vins"] = list(vins)
    if hardware_ids:
        custom["hardware_ids"] = list(hardware_ids)
    targets = _load(directory, Targets.type)
    targets.signed.targets[name].unrecognized_fields["custom"] = custom
    targets.signed.version += 1
    targets.sign(_signer(directory, Targets.type))
    _write(directory, targets)
    publish(directory, expires_days)
    return targets.signed.targets[name]


def rotate_root_key(directory: Path, expires_days: float = 365) -> int:
    """Replace the root key: root N+1 lists the new key and is signed by the old and the new
    one (clients that trust N can follow). Returns the new root version."""
    directory = Path(directory)
    old = _signer(directory, Root.type)
    new = CryptoSigner.generate_ed25519()
    md = _load(directory, Root.type)
    md.signed.revoke_key(old.public_key.keyid, Root.type)
    md.signed.add_key(new.public_key, Root.type)
    md.signed.version += 1
    md.signed.expires = _now() + timedelta(days=expires_days)
    md.signatures.clear()
    md.sign(old, append=True)
    md.sign(new, append=True)
    atomic_write(directory / "keys" / f"{Root.type}.pem", new.private_bytes, mode=0o600)
    _write(directory, md, versioned=True)
    return md.signed.version


def expire_timestamp(directory: Path, seconds_ago: float = 3600) -> None:
    """Re-sign timestamp.json (new version) with an expiry in the past. For tests."""
    resign(directory, Timestamp.type, expires=_now() - timedelta(seconds=seconds_ago))


# -- serving ----------------------------------------------------------------------------

class RepoServer(ThreadingHTTPServer):
    """Serves metadata/ and targets/ of a repository directory on 127.0.0.1.

    `cut_after_bytes`: when set, a response under `cut_prefix` is cut off (connection closed)
    after that many body bytes, with the full Content-Length already announced.
    `bytes_per_s`: when set, responses under `cut_prefix` are sent at about that rate (a slow
    mobile link, so that a download can be cancelled or superseded while it runs).
    `requests`: the paths requested, in order (for tests).
    """

    daemon_threads = True
    cut_after_bytes: int | None = None
    cut_prefix: str = "/targets/"
    bytes_per_s: int | None = None

    def __init__(self, directory: Path, port: int = 0):
        self.directory = Path(directory)
        self.requests: list[str] = []
        super().__init__(("127.0.0.1", port), partial(_Handler, directory=str(directory)))
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def start(self) -> RepoServer:
        self._thread = threading.Thread(target=self.serve_forever, args=(0.05,),
                                        name="tuf-repo-server", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        self.shutdown()
        self.server_close()
        if self._thread is not None:
            self._thread.join(5)

    def handle_error(self, request, client_address) -> None:
        if isinstance(sys.exc_info()[1], OSError):
            return  # a cut connection or a client going away is the point of some tests
        super().handle_error(request, client_address)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Handler(SimpleHTTPRequestHandler):
    server: RepoServer

    def send_head(self):
        path = self.path.split("?", 1)[0]
        self.server.requests.append(path)
        if not path.startswith(("/metadata/", "/targets/")) or path.endswith("/"):
            self.send_error(404, "only metadata/ and targets/ files are served")
            return None
        return super().send_head()

    def copyfile(self, source, outputfile) -> None:
        limit = self.server.cut_after_bytes
        rate = self.server.bytes_per_s
        if rate and self.path.startswith(self.server.cut_prefix):
            chunk = max(1, rate // 20)
            while data := source.read(chunk):
                outputfile.write(data)
                outputfile.flush()
                time.sleep(0.05)
            return None
        if limit is None or not self.path.startswith(self.server.cut_prefix):
            return super().copyfile(source, outputfile)
        outputfile.write(source.read(limit))
        outputfile.flush()
        self.close_connection = True
        self.connection.shutdown(2)  # SHUT_RDWR: the client sees the transfer die

    def log_message(self, format: str, *args: Any) -> None:
        pass


def serve(directory: Path, port: int = 0) -> RepoServer:
    """Start serving `directory` on 127.0.0.1:`port` (0: any free port) in a daemon thread.

    Returns the running server: `.url`, `.close()`, `.cut_after_bytes`.
    """
    if not (Path(directory) / "metadata" / "root.json").is_file():
        raise RepoError(f"{directory}: not a repository (no metadata/root.json)")
    return RepoServer(directory, port).start()


# -- tcu-cloud repo ... -----------------------------------------------------------------

def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register `repo init|add-target|serve` on tcu-cloud's subcommand parser."""
    repo = sub.add_parser("repo", help="a TUF update repository for tests and demos")
    actions = repo.add_subparsers(dest="repo_command", metavar="ACTION", required=True)

    i = actions.add_parser("init", help="create keys and metadata; print the trusted root path")
    i.add_argument("dir")
    i.add_argument("--expires-days", type=float, default=365)
    i.set_defaults(func=_do_init)

    a = actions.add_parser("add-target", help="add an artifact; re-sign targets, snapshot, "
                                              "timestamp")
    a.add_argument("dir")
    a.add_argument("file")
    a.add_argument("--version", required=True, help="dotted numbers, e.g. 1.4.2")
    a.add_argument("--hardware-id", required=True)
    a.add_argument("--name", help="target name (default: the file name)")
    a.add_argument("--expires-days", type=float, default=365)
    a.set_defaults(func=_do_add_target)

    t = actions.add_parser("add-trust", help="publish a trust store (keys inline) as a target "
                                             "vehicles fetch with trust.refresh")
    t.add_argument("dir")
    t.add_argument("file")
    t.add_argument("--trust-version", type=int, required=True, help="integer, never lower "
                   "than the last one (vehicles refuse a rollback)")
    t.add_argument("--name", default="trust.toml", help="target name (trust.toml)")
    t.add_argument("--vin", action="append", default=[], help="only for this VIN; repeatable")
    t.add_argument("--hardware-id", action="append", default=[], help="only for this hardware "
                   "id; repeatable")
    t.add_argument("--expires-days", type=float, default=365)
    t.set_defaults(func=_do_add_trust)

    r = actions.add_parser("rotate-root", help="new root key; root N+1 signed by old and new")
    r.add_argument("dir")
    r.set_defaults(func=lambda args: print(rotate_root_key(Path(args.dir))) or 0)

    s = actions.add_parser("serve", help="serve metadata/ and targets/ on 127.0.0.1")
    s.add_argument("dir")
    s.add_argument("--port", type=int, default=8080)
    s.set_defaults(func=_do_serve)


def _do_init(args: argparse.Namespace) -> int:
    root = init_repo(Path(args.dir), expires_days=args.expires_days)
    print(root)
    print(f"install {root} on vehicles as the trusted TUF root", file=sys.stderr)
    return 0


def _do_add_target(args: argparse.Namespace) -> int:
    from ..core.protocol import parse_version
    from ..errors import UpdateError
    try:
        parse_version(args.version)
    except UpdateError as e:
        raise RepoError(f"--version: {e}") from None
    info = add_target(Path(args.dir), Path(args.file), args.version, args.hardware_id,
                      name=args.name, expires_days=args.expires_days)
    print(f"{info.path} {info.length} sha256:{info.hashes['sha256']}")
    return 0


def _do_add_trust(args: argparse.Namespace) -> int:
    from ..adapters.truststore import parse_trust_store
    from ..errors import ConfigError
    try:  # refuse here what every vehicle would refuse
        parse_trust_store(Path(args.file).read_bytes(), args.file, ())
    except (OSError, ConfigError) as e:
        raise RepoError(f"{args.file}: {e}") from None
    info = add_trust_target(Path(args.dir), Path(args.file), args.trust_version, args.name,
                            args.vin, args.hardware_id, args.expires_days)
    print(f"{info.path} trust_version {args.trust_version} sha256:{info.hashes['sha256']}")
    return 0


def _do_serve(args: argparse.Namespace) -> int:
    try:
        server = serve(Path(args.dir), args.port)
    except OSError as e:
        raise RepoError(f"cannot serve on 127.0.0.1:{args.port}: {e}") from e
    print(f"serving {args.dir} at {server.url} (metadata/ and targets/); Ctrl-C stops",
          file=sys.stderr, flush=True)
    try:
        threading.Event().wait()
    finally:
        server.close()
    return 0
