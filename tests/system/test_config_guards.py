"""Config mistakes are named, through the CLI a user runs, never silently dropped."""

from __future__ import annotations

from pathlib import Path

import pytest

from cluster.cli import main

CONFIG = """\
[experiment]
name = "guard"
duration_us = 200

[vm.web]
mode = "nested"
workload = {{ kind = "nic" }}

[vm.web.churn]
kind = "balloon"
{churn}
"""


def validate(tmp_path: Path, churn: str, capsys) -> tuple[int, str]:
    path = tmp_path / "c.toml"
    path.write_text(CONFIG.format(churn=churn))
    rc = main(["validate", str(path)])
    cap = capsys.readouterr()
    return rc, cap.out + cap.err


@pytest.mark.parametrize("typo", ["page = 8", "interval = 50.0", "Pages = 8"],
                         ids=["page", "interval", "Pages"])
def test_unknown_churn_key_is_an_error_naming_it(tmp_path, capsys, typo):
    """A misspelt churn key fails validation (exit 2) and the message names its key path."""
    rc, text = validate(tmp_path, typo, capsys)
    assert rc == 2
    assert f"vm.web.churn.{typo.split()[0]}" in text


def test_known_churn_keys_validate(tmp_path, capsys):
    """The healthy twin: the same table with real keys validates and shows the churn."""
    rc, text = validate(tmp_path, "pages = 8\ninterval_us = 50.0", capsys)
    assert rc == 0
    assert "balloon" in text
