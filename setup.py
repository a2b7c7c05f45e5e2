"""The package list only; pyproject.toml holds the rest of the configuration.

The executable spec lives at the top of the checkout, `reference/`, and ships inside the package as
`hpd_kernels.reference` (the `package-dir` mapping in pyproject.toml), never as a top-level
`reference`. pyproject.toml cannot add a package to what `packages.find` discovers, so the list is
made here: every package under `hpd_kernels/`, found as `packages.find` found them (namespace
folders included), plus `hpd_kernels.reference`. tests/test_packaging.py checks the built wheel.
"""

from setuptools import find_namespace_packages, setup

setup(packages=find_namespace_packages(include=["hpd_kernels", "hpd_kernels.*"]) + ["hpd_kernels.reference"])
