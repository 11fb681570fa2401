"""Build script for mae_fast.

- The Triton kernels live in the top-level ``kernels/`` folder and install as the subpackage
  ``mae_fast.kernels``; the mapping below makes that hold for ``pip install .`` and
  ``pip install -e .`` alike.
- The CUDA ops in ``csrc/`` build into ``mae_fast._C`` when torch is a CUDA build and nvcc is found
  (install with ``--no-build-isolation`` so the build sees your torch). Without them this is a
  pure-Python install. Environment:

  ``CUDA_HOME``                   the toolkit folder (the one holding ``lib64/libcudart.so``); found
                                  from nvcc's location when unset
  ``MAE_FAST_CUDA_ARCHS``         compute capabilities, default ``80;90`` (plus PTX for the newest)
  ``MAE_FAST_SKIP_CUDA_BUILD=1``  never build the extension; the package then holds
                                  ``cuda_build_skipped.txt`` saying so (ignored by git, removed by
                                  any run without the variable), so that the tests can tell a
                                  build skipped on purpose from one that failed
  ``MAE_FAST_FORCE_CUDA_BUILD=1`` a missing toolkit or CPU-only torch is an error, not a skip
  ``MAX_JOBS``                    parallel compile jobs (default: the machine's cores)

Nothing here touches a GPU, downloads anything or probes nvidia-smi.
"""

import glob
import os
import shutil
import sys

from setuptools import find_packages, setup

PACKAGES = ["mae_fast", *(f"mae_fast.{p}" for p in find_packages("mae_fast")), "mae_fast.kernels"]
HERE = os.path.dirname(os.path.abspath(__file__))
#: The note that MAE_FAST_SKIP_CUDA_BUILD=1 skipped the build (mae_fast.ops.dispatch reads it: CUDA_BUILD_SKIPPED_FILE).
SKIPPED_NOTE = os.path.join(HERE, "mae_fast", "cuda_build_skipped.txt")


def _find_cuda_home():
    """A toolkit folder with the CUDA runtime library, or None."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    for folder in filter(None, candidates):
        if os.path.exists(os.path.join(folder, "bin", "nvcc")) and \
                glob.glob(os.path.join(folder, "lib*", "libcudart.so*")):
            return folder
    return None


def _skip(reason):
    if os.environ.get("MAE_FAST_FORCE_CUDA_BUILD") == "1":
        raise RuntimeError(f"MAE_FAST_FORCE_CUDA_BUILD=1 but the CUDA extension cannot be built: {reason}")
    print(f"mae_fast: not building the CUDA extension ({reason}); installing the pure-Python package",
          file=sys.stderr)
    return [], {}


def _note_skipped_on_purpose(skipped: bool) -> None:
    """Leave the note that the build was skipped on purpose in the package, or remove an earlier one."""
    if not os.path.isdir(os.path.dirname(SKIPPED_NOTE)):
        return
    if skipped:
        with open(SKIPPED_NOTE, "w") as f:
            f.write("MAE_FAST_SKIP_CUDA_BUILD=1 was set when mae_fast was installed: mae_fast._C was not built "
                    "on purpose\n")
    elif os.path.exists(SKIPPED_NOTE):
        os.remove(SKIPPED_NOTE)


def cuda_extension():
    """(ext_modules, cmdclass) for mae_fast._C, or empty ones when it cannot or should not be built."""
    skipped = os.environ.get("MAE_FAST_SKIP_CUDA_BUILD") == "1"
    _note_skipped_on_purpose(skipped)
    if skipped:
        return [], {}
    sources = sorted(glob.glob(os.path.join("csrc", "*.cu")) + glob.glob(os.path.join("csrc", "*.cpp")))
    if not sources:
        return _skip("no sources in csrc/")
    cuda_home = _find_cuda_home()
    if cuda_home is None:
        return _skip("no CUDA toolkit with nvcc and libcudart found; set CUDA_HOME")
    os.environ["CUDA_HOME"] = cuda_home  # before torch.utils.cpp_extension reads it
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CUDAExtension
    except ImportError as exc:
        return _skip(f"torch is not importable in the build environment ({exc}); use --no-build-isolation")
    if torch.version.cuda is None:
        return _skip("torch is a CPU-only build")
    archs = [a.strip() for a in os.environ.get("MAE_FAST_CUDA_ARCHS", "80;90").replace(",", ";").split(";") if a.strip()]
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    gencode.append(f"-gencode=arch=compute_{archs[-1]},code=compute_{archs[-1]}")  # PTX for newer GPUs
    os.environ.setdefault("MAX_JOBS", str(os.cpu_count() or 1))
    extension = CUDAExtension(
        "mae_fast._C", sources=sources, include_dirs=[os.path.join(HERE, "csrc")],
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "-lineinfo", *gencode]})
    return [extension], {"build_ext": BuildExtension}


ext_modules, cmdclass = cuda_extension()

setup(
    packages=PACKAGES,
    package_dir={"mae_fast": "mae_fast", "mae_fast.kernels": "kernels"},
    package_data={"mae_fast": [os.path.basename(SKIPPED_NOTE)]},  # a wheel built without the extension says why
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
