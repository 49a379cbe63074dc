"""Dev mode's socket directory must be the user's own."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from broker.devmode import private_dir
from broker.service import StartupError


def test_created_private(tmp_path: Path) -> None:
    target = tmp_path / "tokenbroker-x"
    private_dir(target)
    assert target.is_dir() and target.stat().st_mode & 0o777 == 0o700
    private_dir(target)  # ours already: fine


def test_open_or_linked_directory_refused(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o777)
    os.chmod(shared, 0o777)
    with pytest.raises(StartupError, match="0700"):
        private_dir(shared)
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "elsewhere")
    (tmp_path / "elsewhere").mkdir(mode=0o700)
    with pytest.raises(StartupError):
        private_dir(link)
