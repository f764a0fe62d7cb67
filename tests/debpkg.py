"""Debian packages a test drives (promtool, prometheus, chromium), installed when missing.

``make test`` installs them first (its ``test-deps`` target); a test run some other way
installs them here, the same way, on first use. Only where apt-get cannot run (not
Debian, not root and no sudo) does the test skip, saying what is missing.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess

import pytest


@functools.cache
def _install(package: str) -> str:
    """ "" when installed, else why it could not be."""
    if shutil.which("apt-get") is None:
        return "apt-get is not available"
    sudo: list[str] = []
    if os.geteuid() != 0:
        if shutil.which("sudo") is None:
            return "not root and no sudo"
        sudo = ["sudo", "-n"]
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (
        ["apt-get", "update", "-q"],
        ["apt-get", "install", "-y", "-q", "--no-install-recommends", package],
    ):
        r = subprocess.run([*sudo, *cmd], env=env, capture_output=True, text=True, timeout=900)
        if r.returncode != 0:
            return f"{' '.join(cmd)} failed: {(r.stderr or r.stdout).strip()[-300:]}"
    return ""


def need(binary: str, package: str) -> str:
    """The path of ``binary``, installing Debian's ``package`` if need be, or skip."""
    path = shutil.which(binary)
    if path is None:
        why = _install(package)
        path = shutil.which(binary)
        if path is None:
            pytest.skip(
                f"{binary} (Debian package {package}) is missing and cannot be installed: "
                f"{why or 'installed, but not on PATH'}"
            )
    return path
