"""Build script for mae_fast.

- The Triton kernels live in the top-level ``kernels/`` folder and install as the subpackage
  ``mae_fast.kernels``; the mapping below makes that hold for ``pip install .`` and
  ``pip install -e .`` alike.
- The CUDA ops in ``csrc/`` build into ``mae_fast._C`` when torch is a CUDA build, nvcc is found
  and a GPU is visible (install with ``--no-build-isolation`` so the build sees your torch). Without
  them this is a pure-Python install. Environment:

  ``CUDA_HOME``                   the toolkit folder (the one holding ``lib64/libcudart.so``); found
                                  from nvcc's location when unset
  ``MAE_FAST_CUDA_ARCHS``         compute capabilities, default ``80;90`` (plus PTX for the newest)
  ``MAE_FAST_FORCE_CUDA_BUILD=1`` build where no GPU is visible (wheels built on a GPU-less node for a
                                  GPU cluster, CI); a missing toolkit or CPU-only torch is then an
                                  error, not a skip (a compile that fails always is one)
  ``MAE_FAST_SKIP_CUDA_BUILD=1``  never build the extension
  ``MAX_JOBS``                    parallel compile jobs (default: the machine's cores)

  A build skipped on purpose (``MAE_FAST_SKIP_CUDA_BUILD=1``) or for lack of a GPU leaves
  ``cuda_build_skipped.txt`` in the package saying which (ignored by git, packaged in wheels, removed
  by any run that builds), so that the tests can tell such a skip from a build that failed.

Whether a GPU is visible is asked of torch (``torch.cuda.is_available()``), which asks the driver how
many devices it sees and nothing more: no CUDA context, no memory, no kernel. The compile takes
minutes per architecture (20 minutes on a 2-core machine for the default two), which is why it is
not made where nothing could run it. Nothing here downloads anything or probes nvidia-smi.
"""

import glob
import os
import shutil
import sys

from setuptools import find_packages, setup

PACKAGES = ["mae_fast", *(f"mae_fast.{p}" for p in find_packages("mae_fast")), "mae_fast.kernels"]
HERE = os.path.dirname(os.path.abspath(__file__))
#: The note that the build was skipped on purpose or for lack of a GPU (mae_fast.ops.dispatch reads it:
#: CUDA_BUILD_SKIPPED_FILE, NO_GPU_NOTE).
SKIPPED_NOTE = os.path.join(HERE, "mae_fast", "cuda_build_skipped.txt")
ON_PURPOSE_NOTE = ("MAE_FAST_SKIP_CUDA_BUILD=1 was set when mae_fast was installed: mae_fast._C was not built on "
                   "purpose")
#: The note's first words when no GPU was visible; mae_fast.ops.dispatch.NO_GPU_NOTE is the same text.
NO_GPU_NOTE = "no GPU was visible when mae_fast was installed"


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


def _leave_note(text):
    """Leave the note saying why the build was skipped in the package, or (text None) remove an earlier one."""
    if not os.path.isdir(os.path.dirname(SKIPPED_NOTE)):
        return
    if text is not None:
        with open(SKIPPED_NOTE, "w") as f:
            f.write(text + "\n")
    elif os.path.exists(SKIPPED_NOTE):
        os.remove(SKIPPED_NOTE)


def cuda_extension():
    """(ext_modules, cmdclass) for mae_fast._C, or empty ones when it cannot or should not be built."""
    _leave_note(None)  # whatever follows, an earlier install's note no longer holds
    if os.environ.get("MAE_FAST_SKIP_CUDA_BUILD") == "1":
        _leave_note(ON_PURPOSE_NOTE)
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
    if os.environ.get("MAE_FAST_FORCE_CUDA_BUILD") != "1" and not torch.cuda.is_available():
        # Minutes of compiling for kernels nothing here could run; a GPU cluster's wheels are built with the variable.
        _leave_note(f"{NO_GPU_NOTE} (torch.cuda.is_available() was false): mae_fast._C was not built; "
                    "MAE_FAST_FORCE_CUDA_BUILD=1 builds it anyway")
        print(f"mae_fast: not building the CUDA extension ({NO_GPU_NOTE}; MAE_FAST_FORCE_CUDA_BUILD=1 builds "
              "it anyway); installing the pure-Python package", file=sys.stderr)
        return [], {}
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
