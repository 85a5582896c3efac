"""Maps the checkout's top-level ``kernels/`` folder to the import name ``grpo_fast.kernels``.

A top-level package named ``kernels`` would clash with Hugging Face's ``kernels`` package, so it is never installed
under that name (regular and editable installs alike).
"""

from setuptools import setup

setup(
    packages=["grpo_fast", "grpo_fast.kernels", "grpo_fast.integrations"],
    package_dir={"grpo_fast": "grpo_fast", "grpo_fast.kernels": "kernels"},
)
