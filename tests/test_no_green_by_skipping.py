"""A missing system dependency skips on a developer's machine and fails under CI=true: pytest run
in a subprocess on a test that lacks one, both ways."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(("ci", "code", "says"), [("true", 1, "FAILED"), ("", 0, "SKIPPED")])
def test_a_missing_system_dependency_fails_under_ci(tmp_path: Path, ci: str, code: int, says: str) -> None:
    (tmp_path / "test_needs.py").write_text(
        "from tests.conftest import missing_system_dependency\n\n"
        "def test_needs_a_tool():\n"
        "    missing_system_dependency('no /usr/bin/a-tool (Debian: a-tool)')\n"
    )
    env = {**os.environ, "CI": ci, "PYTHONPATH": str(ROOT)}
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-ra",
            "-p",
            "no:cacheprovider",
            "--rootdir",
            str(tmp_path),
            str(tmp_path / "test_needs.py"),
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == code, run.stdout + run.stderr
    assert says in run.stdout and "no /usr/bin/a-tool" in run.stdout, run.stdout
