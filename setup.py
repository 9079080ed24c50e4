"""Build hook (all metadata is in pyproject.toml): the wheel carries vdit's shipped files, the
reference configs (`experiments/`) and the trained autoencoder (`checkpoints/`), as package data
under `vdit/_shipped/`, where `vdit.config.shipped_path` finds them after `pip install`."""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

SHIPPED = ("experiments", "checkpoints")


class BuildWithShippedFiles(build_py):
    def run(self) -> None:
        super().run()
        if self.editable_mode:  # an editable install reads them from the checkout itself
            return
        root = Path(__file__).resolve().parent
        for folder in SHIPPED:
            shutil.copytree(root / folder, Path(self.build_lib) / "vdit" / "_shipped" / folder,
                            dirs_exist_ok=True)


setup(cmdclass={"build_py": BuildWithShippedFiles})
