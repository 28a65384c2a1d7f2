"""The docs' "Your own constraint" recipe, as a user follows it: the Python block saved as
``mylab/constraints.py``, then the command printed under it, verbatim (plus one short epoch)."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

from tests.conftest import FAST, ROOT, run_train_cli

PAGE = ROOT / "docs" / "reference" / "constraints.md"


def recipe() -> tuple[str, list[str]]:
    """The recipe's Python block and its command's arguments after ``python train.py``."""
    text = PAGE.read_text()
    section = text[text.index("**Your own constraint**") :]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    command = re.search(r"`(python train\.py [^`]+)`", section).group(1)
    return code, shlex.split(command)[2:]


def test_the_documented_custom_constraint_command_runs_as_printed(tmp_path: Path):
    code, args = recipe()
    package = tmp_path / "mylab"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "constraints.py").write_text(code)
    run_dir = tmp_path / "run"
    result = run_train_cli(
        [*args, *FAST, f"hydra.run.dir={run_dir}"], cwd=tmp_path, env={"PYTHONPATH": f"{tmp_path}:{ROOT}"}
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    violations = {k: v for k, v in summary["constraints"].items() if k.endswith("/row_sum_one")}
    assert list(violations) == ["net.head.2.weight/row_sum_one"], summary["constraints"]
    assert violations["net.head.2.weight/row_sum_one"] < 1e-4  # each row sums to total=2.0 by construction
