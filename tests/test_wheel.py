"""The built wheel, installed into a fresh virtual environment, runs the simulator and the demo
from a directory that is not the checkout (its configs and DBC are package data)."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("wheel")
    # sdist, then the wheel from it (as CI does): no build/ folder in the checkout whose
    # leftovers could slip into the wheel
    subprocess.run([sys.executable, "-m", "build", "--outdir", str(tmp / "dist"), str(ROOT)],
                   check=True, capture_output=True, timeout=300)
    wheel = next((tmp / "dist").glob("tcu_agent-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "agent/data/configs/demo.toml" in names and "agent/data/dbc/demo_ev.dbc" in names
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = next(venv.glob("lib/python3*/site-packages"))
    # The dependencies from this environment; the package itself only from the wheel (a .pth
    # line adds a directory without running that directory's .pth files, editable hooks
    # included).
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"),
                    "install", "-q", "--no-deps", "--no-index", "--ignore-installed",
                    str(wheel)],
                   check=True, capture_output=True, timeout=120)
    return venv


def _run(venv: Path, cwd: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([str(venv / "bin" / "tcu-agent"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_the_installed_package_is_the_wheel(installed, tmp_path):
    out = subprocess.run([str(installed / "bin" / "python"), "-c",
                          "import agent; print(agent.__file__)"], cwd=tmp_path,
                         capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"})
    assert out.stdout.startswith(str(installed)), out


def test_simulate_from_any_directory(installed, tmp_path):
    proc = _run(installed, tmp_path, "simulate", "--interface", "virtual", "--channel",
                "wheel-sim", "--duration", "1")
    assert proc.returncode == 0, proc.stderr
    assert "stopped:" in proc.stderr and "frames sent" in proc.stderr


def test_demo_from_any_directory(installed, tmp_path):
    proc = _run(installed, tmp_path, "demo", "--duration", "8", "--quiet", timeout=90)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "demo OK" in proc.stdout
