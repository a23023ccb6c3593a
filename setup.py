"""Ships the top-level sql/ and migrations/ inside the wheel as hcrepo/_data/.

They stay at the top of the repository (where people look for them) and are copied into
the build at build time, so `pip install hcrepo` works without a checkout.
Metadata lives in pyproject.toml; this file only adds the copy step.
"""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
SHIPPED = ("sql", "migrations")


class build_py_with_data(build_py):
    def run(self) -> None:
        super().run()
        for name in SHIPPED:
            source = ROOT / name
            target = Path(self.build_lib) / "hcrepo" / "_data" / name
            if target.exists():  # a stale copy from an earlier build in the same tree
                shutil.rmtree(target)
            shutil.copytree(source, target, ignore=shutil.ignore_patterns(".*", "__pycache__"))


setup(cmdclass={"build_py": build_py_with_data})
