"""The layout keeps its promises: small files in plugins/, a train.py that reads top to bottom."""

from __future__ import annotations

from tests.conftest import ROOT


def test_no_file_in_plugins_is_above_300_lines():
    long = {str(p.relative_to(ROOT)): n for p in (ROOT / "plugins").rglob("*.py") if (n := len(p.read_text().splitlines())) > 300}
    assert long == {}


def test_train_py_is_at_most_150_lines():
    assert len((ROOT / "train.py").read_text().splitlines()) <= 150
