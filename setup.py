"""setuptools needs setup.py only to hand cffi its builder (cffi_modules is no setup.cfg key)."""
from setuptools import setup

setup(cffi_modules=["blkif/abi/_cffi_build.py:ffibuilder"])
