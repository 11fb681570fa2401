"""Build script for mae_fast.

The Triton kernels live in the top-level ``kernels/`` folder and install as the subpackage
``mae_fast.kernels``; the mapping below makes that hold for ``pip install .`` and
``pip install -e .`` alike.
"""

from setuptools import find_packages, setup

PACKAGES = ["mae_fast", *(f"mae_fast.{p}" for p in find_packages("mae_fast")), "mae_fast.kernels"]

setup(
    packages=PACKAGES,
    package_dir={"mae_fast": "mae_fast", "mae_fast.kernels": "kernels"},
)
