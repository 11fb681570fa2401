"""Build script for mae_fast.

The Triton kernels live in the top-level ``kernels/`` folder and install as the subpackage
``mae_fast.kernels``; the mapping below makes that hold for ``pip install .`` and
``pip install -e .`` alike.
"""

from setuptools import setup

PACKAGES = ["mae_fast", "mae_fast.ops", "mae_fast.kernels"]

setup(
    packages=PACKAGES,
    package_dir={"mae_fast": "mae_fast", "mae_fast.kernels": "kernels"},
)
