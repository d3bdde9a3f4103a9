"""The docs stay in line with the code: every setting and close code is documented."""

from __future__ import annotations

from pathlib import Path

import pytest

from wsgate import CloseCode
from wsgate.config import Settings
from wsgate.configfile import setting_names

DOCS = Path(__file__).resolve().parent.parent / "docs"


@pytest.mark.parametrize("name", setting_names(Settings))
def test_every_setting_is_in_configuration_md(name: str) -> None:
    assert f"`{name}`" in (DOCS / "configuration.md").read_text()


@pytest.mark.parametrize("code", list(CloseCode))
def test_every_close_code_is_in_protocol_md(code: CloseCode) -> None:
    assert f"| {int(code)} |" in (DOCS / "protocol.md").read_text()
