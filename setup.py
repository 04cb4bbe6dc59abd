"""Packages of the xlora-hub distribution (everything else is in pyproject.toml).

``spaces_app/`` stays at the top of the repository, because it is the Space as published, but it is not
installed as a top-level ``spaces_app`` package: its files ship inside the package as
``xlora_hub.space.app_files`` (``package_dir`` maps that name to the folder), so an installed xlora-hub
still finds ``app.py`` (see ``xlora_hub.space.launch.spaces_app_dir``). pyproject.toml's
``[tool.setuptools.packages.find]`` cannot add a package that lives outside the package tree, hence this file.
"""

from setuptools import find_packages, setup

APP_FILES = "xlora_hub.space.app_files"

setup(
    packages=[*find_packages(include=["xlora_hub", "xlora_hub.*"]), APP_FILES],
    package_dir={APP_FILES: "spaces_app"},
    package_data={APP_FILES: ["README.md"]},
)
