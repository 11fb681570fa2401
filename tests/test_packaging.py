"""The package installs from a wheel with ``kernels/`` mapped to ``mae_fast.kernels``."""

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    # Built from a copy of the sources: pip builds in the tree it is given, and setup.py run with
    # MAE_FAST_SKIP_CUDA_BUILD=1 leaves its note in the package, which would tell this checkout's tests that its own
    # extension was skipped on purpose.
    source = tmp_path_factory.mktemp("source")
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    for folder in ("mae_fast", "kernels"):
        shutil.copytree(REPO / folder, source / folder,
                        ignore=shutil.ignore_patterns("__pycache__", "*.so", "cuda_build_skipped.txt"))
    out = tmp_path_factory.mktemp("wheel")
    env = {**os.environ, "MAE_FAST_SKIP_CUDA_BUILD": "1"}
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out),
                    str(source)], check=True, env=env, cwd=out)
    wheels = list(out.glob("mae_fast-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


def test_wheel_contains_the_kernels_subpackage(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert "mae_fast/kernels/__init__.py" in names
    assert "mae_fast/ops/gather_patches.py" in names and "mae_fast/data/dali_loader.py" in names
    assert "mae_fast/kernels/masked_patch_loss.py" in names
    assert not any(n.startswith("kernels/") for n in names)
    assert "mae_fast/cuda_build_skipped.txt" in names  # built with MAE_FAST_SKIP_CUDA_BUILD=1: the wheel says so


def test_installed_wheel_imports_from_outside_the_repo(wheel, tmp_path):
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
                   check=True)
    code = ("import mae_fast, mae_fast.kernels, mae_fast.ops; "
            "print(mae_fast.__file__); print(mae_fast.kernels.__file__); "
            "print(mae_fast.ops.dispatch.cuda_build_skipped() is not None)")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(site)
    # -I would drop site-packages (torch); -P keeps the cwd off sys.path so the repo cannot shadow the wheel.
    result = subprocess.run([sys.executable, "-P", "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    pkg, kernels, skipped_note_found = result.stdout.split()
    assert skipped_note_found == "True"  # the installed package reads the note it was built with
    assert Path(pkg).is_relative_to(site) and Path(kernels).is_relative_to(site)
    assert Path(kernels).parent.name == "kernels" and Path(kernels).parent.parent.name == "mae_fast"
