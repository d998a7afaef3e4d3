"""A fresh virtualenv: ``pip install .`` gives working ``gconn`` and ``python -m gconn``."""

import pathlib
import subprocess
import sys

import pytest

from gconn import __version__

ROOT = pathlib.Path(__file__).resolve().parent.parent


@pytest.mark.timeout(600)
def test_pip_install_in_a_fresh_venv_gives_both_entry_points(tmp_path):
    """After pip install . into a new venv, gconn --version and python -m gconn --version work."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    install = subprocess.run([str(python), "-m", "pip", "install", "-q", str(ROOT)],
                             capture_output=True, text=True, timeout=540)
    assert install.returncode == 0, install.stderr[-3000:]
    for command in ([str(venv / "bin" / "gconn"), "--version"],
                    [str(python), "-m", "gconn", "--version"],
                    [str(venv / "bin" / "gconn-echo"), "--help"]):
        result = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path)
        assert result.returncode == 0, result.stderr
    result = subprocess.run([str(python), "-m", "gconn", "--version"], capture_output=True,
                            text=True, cwd=tmp_path)
    assert result.stdout.strip() == f"gconn {__version__}"
