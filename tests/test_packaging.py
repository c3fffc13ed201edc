"""`pip install .` gives a working `sd-webui-training` command, runnable from any folder.

The project is built into a wheel (from a copy of the tree, so the checkout gets no build files) and
installed without dependencies into a fresh virtual environment, which sees the test interpreter's
packages (torch, gradio, ...) through a .pth file: no download, and the installed code is the only
`lib_training` it can import.
"""

from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_NOT_SOURCE = shutil.ignore_patterns(
    ".git", ".venv", "build", "outputs", "__pycache__", "*.egg-info", ".ruff_cache", ".pytest_cache", "test-artifacts"
)


def _run(*command: str | Path, cwd: Path) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    done = subprocess.run([str(c) for c in command], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{command} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bin/ folder of a fresh venv with the project's wheel installed."""
    base = tmp_path_factory.mktemp("packaging")
    source = base / "source"
    shutil.copytree(ROOT, source, ignore=_NOT_SOURCE)
    wheels = base / "wheels"
    _run(
        sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", wheels, source, cwd=base
    )
    venv = base / "venv"
    _run(sys.executable, "-m", "venv", "--without-pip", venv, cwd=base)
    python = venv / "bin" / "python"
    purelib = Path(_run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])", cwd=base).strip())
    (purelib / "test-interpreter-packages.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    wheel = next(wheels.glob("sd_webui_training-*.whl"))
    _run(sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "-q", wheel, cwd=base)
    return venv / "bin"


@pytest.mark.slow
def test_the_console_command_runs_from_another_folder(installed: Path, tmp_path: Path) -> None:
    text = _run(installed / "sd-webui-training", "--help", cwd=tmp_path)
    for command in ("train", "serve", "merge", "make-tiny", "generate"):
        assert command in text
    assert "--lr" in _run(installed / "sd-webui-training", "train", "embedding", "--help", cwd=tmp_path)


@pytest.mark.slow
def test_the_installed_package_carries_its_templates_page_files_and_module_entry(installed: Path, tmp_path) -> None:
    code = (
        "import lib_training, sys; from lib_training.dataset import builtin_templates;"
        "from lib_training.app.ui import assets;"
        "print(lib_training.__file__); print(builtin_templates());"
        "assert 'sdwt-invalid' in assets.style() and assets.script()"
    )
    out = _run(installed / "python", "-c", code, cwd=tmp_path)
    where, templates = out.splitlines()[:2]
    assert str(installed.parent) in where and str(ROOT) not in where
    assert "subject_filewords" in templates
    assert "train" in _run(installed / "python", "-m", "lib_training", "--help", cwd=tmp_path)
