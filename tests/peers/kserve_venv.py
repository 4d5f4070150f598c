"""KServe's Python client in a venv of its own, for the tests that drive cairn's endpoint with it.

kserve 0.21.0 requires pandas<3 and psutil<6, where cairn's lock pins pandas 3 (a runtime
dependency) and psutil 7: they cannot share one environment, so the client gets `.venv-kserve`
(git-ignored) and the tests run it in a subprocess (tests/peers/kserve_infer.py). `make test`
creates it before the suite (`python -m tests.peers.kserve_venv`), so its install is not counted
in the suite's time; a test run without it creates it on first use.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
VENV = ROOT / ".venv-kserve"
SPEC = ["kserve==0.21.0"]


def kserve_python(venv: Path = VENV) -> Path:
    """The venv's python, the venv created and filled first if it is not there yet."""
    python = venv / "bin" / "python"
    marker = venv / ".installed"
    if marker.exists() and marker.read_text() == " ".join(SPEC):
        return python
    print(f"creating {venv} for KServe's client ({' '.join(SPEC)})", file=sys.stderr)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(venv / "bin" / "pip"), "install", "-q", *SPEC], check=True)
    marker.write_text(" ".join(SPEC))
    return python


if __name__ == "__main__":
    print(kserve_python())
