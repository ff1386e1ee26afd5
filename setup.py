"""Ship host-profiles/ inside the vmctl package.

The policies live beside the package in the repository (one place, read by
people and by both renderers); a built wheel must carry them, or a plain
`pip install .` would find no profile. Everything else is in pyproject.toml.
"""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildPy(build_py):
    def run(self) -> None:
        super().run()
        src = Path(__file__).parent / "host-profiles"
        if src.is_dir():
            shutil.copytree(
                src, Path(self.build_lib) / "vmctl" / "host-profiles", dirs_exist_ok=True
            )


setup(cmdclass={"build_py": BuildPy})
