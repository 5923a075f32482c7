"""The front's dependencies on uvicorn's and uvloop's internals: served only on the releases
it was tested with, and those are the ones pyproject.toml pins."""

from __future__ import annotations

import importlib.metadata
import re
import tomllib
from pathlib import Path

import pytest

from runtime.errors import ConfigError
from runtime.front import server

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"


def test_the_installed_releases_are_the_tested_ones() -> None:
    server.check_versions()


def test_another_release_or_a_missing_library_is_refused_by_name() -> None:
    def installed(name: str) -> str:
        if name == "httptools":
            raise importlib.metadata.PackageNotFoundError(name)
        return {"uvicorn": "0.56.1"}.get(name) or importlib.metadata.version(name)

    with pytest.raises(ConfigError) as caught:
        server.check_versions(installed)
    assert "uvicorn 0.56.1 (tested: 0.55.x)" in caught.value.message
    assert "httptools none (tested: 0.9.x)" in caught.value.message
    assert "uvloop" not in caught.value.message
    assert ConfigError.exit_code == 2


def test_the_tested_releases_are_what_pyproject_pins() -> None:
    deps = tomllib.loads(PYPROJECT.read_text())["project"]["dependencies"]
    for name, release in server.TESTED_RELEASES.items():
        (spec,) = [d for d in deps if re.match(rf"{name}(\[|>|=|<)", d)]
        major, minor = release.split(".")
        assert f">={release}," in spec and f",<{major}.{int(minor) + 1}" in spec, spec
