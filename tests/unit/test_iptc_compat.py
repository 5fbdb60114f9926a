"""python-iptables' internals are used only for versions netvm was checked against."""

from __future__ import annotations

import importlib.metadata

import pytest

from netvm import NetvmError
from netvm.backends import iptc_compat


def test_the_installed_version_is_supported() -> None:
    assert iptc_compat.check_version().startswith(iptc_compat.SUPPORTED)


@pytest.mark.parametrize("version", ["1.3.0", "2.0", "1.1.9", "0.14.0"])
def test_another_version_is_refused_with_what_to_install(
    monkeypatch: pytest.MonkeyPatch, version: str
) -> None:
    monkeypatch.setattr(importlib.metadata, "version", lambda name: version)
    with pytest.raises(NetvmError) as error:
        iptc_compat.check_version()
    assert f"python-iptables {version} is not supported" in str(error.value)
    assert ">=1.2,<1.3" in str(error.value)


def test_a_missing_package_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    def missing(name: str) -> str:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", missing)
    with pytest.raises(NetvmError, match="python-iptables is not installed"):
        iptc_compat.check_version()
