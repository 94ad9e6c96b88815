"""Packaging that pyproject.toml cannot say: one `.pth` file installed into site-packages.

`lora_service_torchvision.pth` imports `_lora_service_torchvision` (see its docstring) in every
interpreter of the environment, so a user's own diffusers script works without importing
lora_service first. A package's own files reach site-packages only through setuptools' import
machinery, which an editable install (`pip install -e .`, what `make test` does) replaces with
a finder; a data file, though, is copied as a file, relative to the environment's prefix. So
the `.pth` is a data file whose folder is site-packages relative to the prefix, computed for the
interpreter that builds (the one pip installs into).

setuptools' editable wheel skips data files (`editable_wheel._run_install("data")` asks the
distribution for `has_data()`, which does not exist; it has `has_data_files()`):
`EditableWheel` installs them as a regular wheel does. Should a setuptools release rename that
method, the `.pth` goes missing from editable installs and
`tests/versions/test_user_script.py` says so.
"""

import os
import sysconfig

from setuptools import setup
from setuptools.command.editable_wheel import editable_wheel

SITE_PACKAGES = os.path.relpath(sysconfig.get_path("purelib"), sysconfig.get_path("data"))


class EditableWheel(editable_wheel):
    def _run_install(self, category: str) -> None:
        if category != "data":
            super()._run_install(category)
        elif self.distribution.has_data_files():
            self.run_command("install_data")


setup(
    data_files=[(SITE_PACKAGES, ["lora_service_torchvision.pth"])],
    cmdclass={"editable_wheel": EditableWheel},
)
