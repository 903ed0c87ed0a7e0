"""Only the package list; everything else is in pyproject.toml. configs/ is not below jaxalign/, so no find directive in
pyproject.toml can name it: it becomes the package jaxalign.configs (its YAML recipes and model configs as data)."""
from setuptools import find_packages, setup

setup(packages=find_packages(include=["jaxalign", "jaxalign.*"]) + ["jaxalign.configs", "jaxalign.configs.models"])
