"""Build hook: copy the files faxd ships (faxd/shipped.py: SHIPPED) from the repository's top level into
the package, so a wheel carries them as package data while the top-level files stay their only source.

Everything else about the build is declared in pyproject.toml. An editable install copies nothing: faxd
then reads the files from the checkout (faxd/shipped.py).
"""

from __future__ import annotations

import os
import runpy

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))
# Read by path, not imported: a build must not import faxd (an older faxd may be the one on sys.path).
_shipped = runpy.run_path(os.path.join(HERE, "faxd", "shipped.py"))
SHIPPED: tuple[str, ...] = _shipped["SHIPPED"]
PACKAGE_DIR: str = _shipped["PACKAGE_DIR"]


class build_py_with_shipped_files(build_py):
    def _shipped_targets(self) -> list[tuple[str, str]]:
        return [
            (
                os.path.join(HERE, *rel.split("/")),
                os.path.join(self.build_lib, "faxd", PACKAGE_DIR, *rel.split("/")),
            )
            for rel in SHIPPED
        ]

    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):
            return
        for source, target in self._shipped_targets():
            if not os.path.isfile(source):
                # An sdist without MANIFEST.in's entries, or a file renamed without updating SHIPPED.
                raise SystemExit(
                    f"faxd build: {source} is missing; it must ship in the wheel (faxd/shipped.py)"
                )
            self.mkpath(os.path.dirname(target))
            self.copy_file(source, target, preserve_mode=False)

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:
        outputs = list(super().get_outputs(include_bytecode))
        if not getattr(self, "editable_mode", False):
            outputs += [target for _, target in self._shipped_targets()]
        return outputs


setup(cmdclass={"build_py": build_py_with_shipped_files})
