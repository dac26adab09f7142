"""Host side of the vcan VM tier: fetch a kernel, build an initramfs, boot QEMU, report.

Steps (each prints one `vm:` progress line):
  1. kernel: `apt-get download linux-image-<abi>-amd64` (the version linux-image-amd64 depends
     on), `dpkg-deb -x`, keep vmlinuz and the few modules the guest needs (cached);
  2. initramfs: busybox-static + those modules in dependency order (from each module's
     .modinfo `depends=`, the package ships no modules.dep and the host's kernel differs) +
     tests/vm/init, written as a gzip'd newc cpio by this script (no cpio needed; cached);
  3. QEMU (TCG, not KVM): the host's / read-only over virtio-9p ("host"), a writable result
     directory over virtio-9p ("result") holding the job script, the guest's status and JUnit
     XML; the serial console is streamed here with a `guest|` prefix;
  4. the exit status is pytest's inside the guest (from the result directory); a guest that
     never wrote one, a timeout or a boot failure is a failure, never a pass.
Standard library only; runs under the host's python3.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import re
import shlex
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
import time
import xml.etree.ElementTree as ET
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent  # the checkout whose tests run in the guest
WANTED_MODULES = ["virtio_pci", "9pnet_virtio", "9p", "overlay", "can", "can_raw", "can_dev",
                  "vcan", "can_isotp"]  # can-isotp.ko: the kernel's ISO-TP sockets (diagnostics)
DEFAULT_PYTEST_ARGS = ["-m", "vcan"]
RUNNER_FAILED = 2


def say(msg: str) -> None:
    print(f"vm: {msg}", flush=True)


def die(msg: str, status: int = RUNNER_FAILED) -> "NoReturn":  # noqa: F821
    print(f"vm: ERROR: {msg}", file=sys.stderr, flush=True)
    sys.exit(status)


def cache_dir() -> Path:
    if os.environ.get("TCU_VM_CACHE"):
        path = Path(os.environ["TCU_VM_CACHE"])
    elif os.geteuid() == 0:
        path = Path("/var/cache/tcu-agent-vm")
    else:
        path = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "tcu-agent-vm"
    path.mkdir(parents=True, exist_ok=True)
    return path


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=True, text=True, capture_output=True, **kw)


# -- 1. kernel ------------------------------------------------------------------------------

def kernel_package() -> str:
    """linux-image-<abi>-amd64 that Debian's linux-image-amd64 currently depends on."""
    if os.environ.get("TCU_VM_KERNEL_PKG"):
        return os.environ["TCU_VM_KERNEL_PKG"]
    try:
        out = run(["apt-cache", "depends", "linux-image-amd64"]).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        raise RuntimeError(f"apt-cache depends linux-image-amd64 failed: {e}") from None
    m = re.search(r"Depends:\s*(linux-image-\S+-amd64)\b", out)
    if not m:
        raise RuntimeError(f"no linux-image-*-amd64 in `apt-cache depends linux-image-amd64`:\n{out}")
    return m.group(1)


def fetch_kernel(cache: Path) -> tuple[Path, Path]:
    """(vmlinuz, module dir) for the guest kernel; downloads and extracts once."""
    try:
        try:
            pkg = kernel_package()
        except RuntimeError:
            if os.geteuid() != 0:
                raise
            say("kernel: no package lists yet: apt-get update")  # a fresh machine
            run(["apt-get", "update", "-q"])
            pkg = kernel_package()
    except (RuntimeError, OSError, subprocess.CalledProcessError) as e:
        cached = sorted(cache.glob("linux-image-*/vmlinuz"))
        if not cached:
            die(f"{e}; and no cached kernel in {cache} (run `apt-get update`?)")
        say(f"kernel: {e}; using the cached {cached[-1].parent.name}")
        return cached[-1], cached[-1].parent / "modules"
    dest = cache / pkg
    vmlinuz = dest / "vmlinuz"
    if vmlinuz.is_file() and (dest / "modules" / ".complete").exists() and all(
            (dest / "modules" / f"{_norm(n)}.ko").exists() for n in WANTED_MODULES):
        say(f"kernel: {pkg} (cached in {dest})")
        return vmlinuz, dest / "modules"
    say(f"kernel: downloading {pkg} (apt-get download) ...")
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(dir=cache, prefix="dl-") as tmp:
        tmp_path = Path(tmp)
        os.chmod(tmp, 0o777)  # apt's _apt sandbox user may write the download here
        try:
            run(["apt-get", "download", "-q", pkg], cwd=tmp)
        except (OSError, subprocess.CalledProcessError) as e:
            die(f"apt-get download {pkg} failed: {getattr(e, 'stderr', '') or e}")
        deb = next(tmp_path.glob("*.deb"))
        run(["dpkg-deb", "-x", str(deb), str(tmp_path / "x")])
        boot = tmp_path / "x" / "boot"
        kernel = next(boot.glob("vmlinuz-*"))
        kver = kernel.name[len("vmlinuz-"):]
        src_mods = tmp_path / "x" / "lib" / "modules" / kver
        if dest.exists():
            shutil.rmtree(dest)
        (dest / "modules").mkdir(parents=True)
        shutil.copy2(kernel, vmlinuz)
        shutil.copy2(next(boot.glob("config-*")), dest / "config")
        # keep only what the initramfs takes: the wanted modules and their dependencies
        index = module_index(src_mods)
        for name in resolve_order(index, WANTED_MODULES):
            shutil.copy2(index[name][0], dest / "modules" / f"{name}.ko")
        (dest / "modules" / "kver").write_text(kver + "\n")
        (dest / "modules" / ".complete").write_text("")
    for stale in cache.glob("linux-image-*"):  # kernels Debian has since replaced
        if stale.is_dir() and stale != dest:
            shutil.rmtree(stale, ignore_errors=True)
    say(f"kernel: {pkg} ready in {time.monotonic() - t0:.1f} s ({dest})")
    return vmlinuz, dest / "modules"


def modinfo(path: Path) -> dict[str, str]:
    """The .modinfo section of an ELF64 kernel module as {key: value} (last one wins)."""
    data = path.read_bytes()
    if data[:4] != b"\x7fELF" or data[4] != 2:
        raise ValueError(f"{path}: not an ELF64 module (compressed modules are not supported)")
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)

    def section(i):
        name, _type, _flags, _addr, off, size = struct.unpack_from("<IIQQQQ", data,
                                                                   shoff + i * shentsize)
        return name, off, size

    _, stroff, _ = section(shstrndx)
    for i in range(shnum):
        name_off, off, size = section(i)
        end = data.index(b"\0", stroff + name_off)
        if data[stroff + name_off:end] == b".modinfo":
            info = {}
            for entry in data[off:off + size].split(b"\0"):
                if b"=" in entry:
                    k, v = entry.decode(errors="replace").split("=", 1)
                    info[k] = v
            return info
    return {}


def _norm(name: str) -> str:
    return name.replace("-", "_")


def module_index(moddir: Path) -> dict[str, tuple[Path, list[str]]]:
    """{module name: (path, [dependencies])} for every .ko under a module tree."""
    index = {}
    for ko in moddir.rglob("*.ko"):
        index[_norm(ko.name[:-3])] = (ko, None)
    return index


def resolve_order(index: dict, wanted: list[str]) -> list[str]:
    """Wanted modules and their dependencies, each after what it depends on."""
    order: list[str] = []
    visiting: set[str] = set()

    def visit(name: str) -> None:
        name = _norm(name)
        if name in order:
            return
        if name not in index:
            raise RuntimeError(f"module {name} not found (built in? then drop it from the list)")
        if name in visiting:
            raise RuntimeError(f"module dependency cycle at {name}")
        visiting.add(name)
        path, deps = index[name]
        if deps is None:
            deps = [d for d in modinfo(path).get("depends", "").split(",") if d]
            index[name] = (path, deps)
        for d in deps:
            visit(d)
        visiting.discard(name)
        order.append(name)

    for w in wanted:
        visit(w)
    return order


# -- 2. initramfs ---------------------------------------------------------------------------

def _cpio_entry(out: io.BytesIO, ino: int, name: str, mode: int, data: bytes = b"",
                rdev: tuple[int, int] = (0, 0)) -> None:
    """One entry of a "newc" cpio archive (what the kernel unpacks as an initramfs)."""
    name_b = name.encode() + b"\0"
    header = (b"070701" + b"".join(b"%08X" % v for v in (
        ino, mode, 0, 0, 1, 0, len(data), 0, 0, *rdev, len(name_b), 0)))
    out.write(header + name_b)
    out.write(b"\0" * (-(len(header) + len(name_b)) % 4))
    out.write(data)
    out.write(b"\0" * (-len(data) % 4))


def build_initramfs(cache: Path, moddir: Path) -> Path:
    busybox = shutil.which("busybox") or "/bin/busybox"
    if not os.path.exists(busybox):
        die("busybox not found: install busybox-static (.ci/install-system-deps)")
    bb = Path(busybox).read_bytes()
    if b"ld-linux" in bb[:4096] or b"/lib64/ld-" in bb[:8192]:
        die(f"{busybox} is dynamically linked: install busybox-static")
    init = (HERE / "init").read_bytes()
    order = resolve_order(module_index(moddir), WANTED_MODULES)
    mods = [(n, (moddir / f"{n}.ko").read_bytes()) for n in order]
    digest = hashlib.sha256(bb + init + b"".join(n.encode() + d for n, d in mods)).hexdigest()[:16]
    path = moddir.parent / f"initramfs-{digest}.cpio.gz"
    if path.is_file():
        say(f"initramfs: cached ({path.name}, modules: {' '.join(order)})")
        return path
    out = io.BytesIO()
    ino = 1
    for d in ("bin", "dev", "proc", "sys", "mnt", "lib", "lib/modules", "run"):
        _cpio_entry(out, ino, d, 0o040755)
        ino += 1
    _cpio_entry(out, ino, "dev/console", 0o020600, rdev=(5, 1))  # before devtmpfs is up
    ino += 1
    _cpio_entry(out, ino, "bin/busybox", 0o100755, bb)
    ino += 1
    _cpio_entry(out, ino, "init", 0o100755, init)
    ino += 1
    for n, data in mods:
        _cpio_entry(out, ino, f"lib/modules/{n}.ko", 0o100644, data)
        ino += 1
    _cpio_entry(out, ino, "lib/modules/order", 0o100644, ("\n".join(order) + "\n").encode())
    ino += 1
    _cpio_entry(out, 0, "TRAILER!!!", 0)
    raw = out.getvalue()
    for old in moddir.parent.glob("initramfs-*.cpio.gz"):
        old.unlink()
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(gzip.compress(raw, 6))
    tmp.replace(path)
    say(f"initramfs: built {path.name} ({path.stat().st_size // 1024} KiB; "
        f"modules: {' '.join(order)})")
    return path


# -- 3. the guest ---------------------------------------------------------------------------

def job_script(result_mount: str, pytest_args: list[str]) -> str:
    venv_python = ROOT / ".venv" / "bin" / "python"
    args = " ".join(shlex.quote(a) for a in pytest_args)
    return f"""#!/bin/sh
# Written by tests/vm/vm.py; runs as root inside the guest (chroot into the host's root).
R={result_mount}
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root TMPDIR=/tmp LANG=C.UTF-8 PYTHONUNBUFFERED=1 TCU_VCAN_REQUIRED=1
export TCU_IN_VM=1
if ! cd {shlex.quote(str(ROOT))}; then
    echo "the guest cannot reach the checkout {ROOT}" > $R/error
    echo 2 > $R/status
    exit 2
fi
ip link set lo up
for i in 0 1; do
    ip link add dev vcan$i type vcan && ip link set up vcan$i
done
ip -brief link
if [ ! -x {shlex.quote(str(venv_python))} ]; then
    echo "tcu-vm: no virtual environment at {venv_python} (run ./run test once on the host)"
    echo "no virtual environment at {venv_python} in the guest (run ./run test once on the host)" > $R/error
    echo 2 > $R/status
    exit 2
fi
echo "tcu-vm: pytest {args}"
{shlex.quote(str(venv_python))} -m pytest -p no:cacheprovider --junitxml=$R/junit.xml {args}
st=$?
echo $st > $R/status
sync
exit $st
"""


def boot(vmlinuz: Path, initrd: Path, pytest_args: list[str], timeout_s: float) -> int:
    qemu = shutil.which("qemu-system-x86_64")
    if not qemu:
        die("qemu-system-x86_64 not found: install qemu-system-x86 (.ci/install-system-deps)")
    with tempfile.TemporaryDirectory(prefix="tcu-vm-result-") as result:
        res = Path(result)
        os.chmod(result, 0o755)
        (res / "job.sh").write_text(job_script("/run/tcu-vm", pytest_args))
        (res / "checkout").write_text(f"{ROOT}\n")  # tests/vm/init mounts it in the guest
        cmd = [qemu, "-accel", "tcg,thread=multi", "-cpu", "max", "-m", "1024", "-smp", "2",
               "-nographic", "-no-reboot", "-nic", "none",
               "-kernel", str(vmlinuz), "-initrd", str(initrd),
               "-append", "console=ttyS0 panic=-1 loglevel=3 quiet",
               "-virtfs", "local,path=/,mount_tag=host,security_model=none,readonly=on,"
                          "multidevs=remap",
               "-virtfs", f"local,path={result},mount_tag=result,security_model=none,"
                          "multidevs=remap"]
        say(f"qemu: booting ({os.path.basename(qemu)} -accel tcg -cpu max -m 1024 -smp 2; "
            f"limit {timeout_s:.0f} s)")
        t0 = time.monotonic()
        log = open(res / "console.log", "wb")
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT)

        def pump():
            for line in iter(proc.stdout.readline, b""):
                log.write(line)
                text = line.decode(errors="replace").rstrip("\r\n")
                text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]|\x1bc", "", text)
                print(f"guest| {text}", flush=True)

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            reader.join(5)
            die(f"the VM did not finish within {timeout_s:.0f} s (killed; see the guest| lines)",
                124)
        reader.join(5)
        log.close()
        elapsed = time.monotonic() - t0
        status_file = res / "status"
        if (res / "error").exists():  # the guest could not start pytest: say why, not "exit 2"
            die(f"in the guest: {(res / 'error').read_text().strip()}")
        if not status_file.exists():
            die(f"the guest wrote no test status (qemu exit {proc.returncode} after "
                f"{elapsed:.1f} s): it did not boot or the job did not run; see the guest| lines")
        status = int(status_file.read_text().strip() or RUNNER_FAILED)
        summary = junit_summary(res / "junit.xml")
        say(f"guest finished in {elapsed:.1f} s: pytest exit {status}; {summary}")
        if status == 0 and LAST_COUNTS.get("skipped"):
            say("a vcan test skipped inside the VM, where everything it needs is present: "
                "counted as a failure")
            return 1
        return status


LAST_COUNTS: dict[str, int] = {}  # of the guest's pytest run, for the closing line


def junit_summary(path: Path) -> str:
    if not path.exists():
        return "no JUnit report"
    root = ET.parse(path).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    if suite is None:
        return "empty JUnit report"
    n = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    passed = n["tests"] - n["failures"] - n["errors"] - n["skipped"]
    LAST_COUNTS.update(passed=passed, failed=n["failures"] + n["errors"], skipped=n["skipped"])
    return (f"{n['tests']} tests: {passed} passed, {n['failures']} failed, {n['errors']} errors, "
            f"{n['skipped']} skipped")


def pytest_arguments(argv: list[str]) -> list[str]:
    """`-m vcan` + the caller's arguments, over the test files that use the marker unless the
    caller names paths (collecting the whole suite under TCG costs over half a minute and
    would select nothing more)."""
    names_paths = any(not a.startswith("-") and (ROOT / a.split("::")[0]).exists()
                      for a in argv)
    files = [] if names_paths else sorted(
        str(p.relative_to(ROOT)) for p in (ROOT / "tests").rglob("test_*.py")
        if "mark.vcan" in p.read_text(errors="replace"))
    return DEFAULT_PYTEST_ARGS + argv + (files if names_paths or files else ["tests"])


def main(argv: list[str]) -> int:
    t0 = time.monotonic()
    timeout_s = float(os.environ.get("TCU_VM_TIMEOUT", "900"))
    pytest_args = pytest_arguments(argv)
    if sys.platform != "linux" or os.uname().machine != "x86_64":
        die("the VM tier runs on x86_64 Linux hosts only")
    cache = cache_dir()
    say(f"cache: {cache}")
    vmlinuz, moddir = fetch_kernel(cache)
    initrd = build_initramfs(cache, moddir)
    remaining = timeout_s - (time.monotonic() - t0)
    status = boot(vmlinuz, initrd, pytest_args, max(remaining, 10.0))
    say(f"total {time.monotonic() - t0:.1f} s; {'PASSED' if status == 0 else 'FAILED'} "
        f"(exit {status})")
    if LAST_COUNTS:  # a plain closing line that CI log readers understand
        print(f"vcan: {LAST_COUNTS['passed']} passed, {LAST_COUNTS['failed']} failed, "
              f"{LAST_COUNTS['skipped']} skipped", flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
