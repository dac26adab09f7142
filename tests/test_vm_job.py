"""The vcan VM's guest side, the parts that run without a VM: a guest that cannot reach the
checkout says so (not "pytest exit 2"), and the init puts the checkout back after its tmpfs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "vm"))
import vm  # noqa: E402  (tests/vm/vm.py: the host side of the VM tier)


def test_a_job_that_cannot_reach_the_checkout_says_so(tmp_path, monkeypatch):
    gone = tmp_path / "checkout-under-tmp"
    monkeypatch.setattr(vm, "ROOT", gone)
    result = tmp_path / "result"
    result.mkdir()
    job = result / "job.sh"
    job.write_text(vm.job_script(str(result), ["-m", "vcan"]))
    proc = subprocess.run(["sh", str(job)], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2
    assert (result / "status").read_text().strip() == "2"
    assert (result / "error").read_text() == f"the guest cannot reach the checkout {gone}\n"


def test_the_init_mounts_the_checkout_after_the_guest_tmpfs():
    init = (ROOT / "tests" / "vm" / "init").read_text().splitlines()
    tmpfs = next(i for i, line in enumerate(init) if line.startswith("mount -t tmpfs")
                 and line.rstrip().endswith("$R/tmp"))
    bind = next(i for i, line in enumerate(init) if 'mount --bind /mnt/checkout "$R$CHECKOUT"'
                in line)
    assert bind > tmpfs
