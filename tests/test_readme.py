"""Every command in the README runs. The ``python train.py`` lines (and ``make train``, which is one)
are run here as printed, from an empty folder, with overrides appended that shrink them to one short
epoch; the other ``make`` targets are what CI runs (``.ci/run``). A command that neither covers fails
here, and so does a README longer than a front page or a link to a page that is not there."""

from __future__ import annotations

import math
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import FAST, ROOT, compose_config, run_train_cli

README = ROOT / "README.md"
MAX_LINES = 200
CI_TARGETS = ("lint", "docs", "test")  # the make targets .ci/run runs, in this order
INLINE_COMMANDS = ("python ", "make ", ".venv/bin/")  # an inline code span that starts so is a command


@dataclass(frozen=True)
class TrainRun:
    """A README command that is ``python train.py ARGS``, and the folder a ``tensorboard`` tail reads."""

    args: tuple[str, ...]
    logdir: str | None = None


def _fenced(text: str, lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```", text, flags=re.M | re.S)


def readme_commands(text: str) -> list[tuple[str, ...]]:
    """The words of every command: each line of a fenced bash block (continuations joined, comments
    dropped), and each inline code span outside the blocks that starts like a command."""
    commands = []
    for block in _fenced(text, "bash"):
        for line in block.replace("\\\n", " ").splitlines():
            words = tuple(shlex.split(line, comments=True))
            if words:
                commands.append(words)
    prose = re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)
    commands += [tuple(shlex.split(span)) for span in re.findall(r"`([^`\n]+)`", prose) if span.startswith(INLINE_COMMANDS)]
    return commands


def _segments(words: tuple[str, ...]) -> list[tuple[str, ...]]:
    parts, current = [], []
    for word in words:
        if word == "&&":
            parts.append(tuple(current))
            current = []
        else:
            current.append(word)
    return [*parts, tuple(current)]


def coverage(words: tuple[str, ...]) -> TrainRun | str | None:
    """How a README command is run: a :class:`TrainRun` this file runs, ``"ci"`` for a make target
    .ci/run runs, or None when nothing runs it."""
    first, *rest = _segments(words)
    logdir = None
    for tail in rest:  # a dashboard opened on what the run wrote: checked by the files being there
        if len(tail) != 3 or tail[:2] != ("tensorboard", "--logdir"):
            return None
        logdir = tail[2]
    if first[:2] == ("python", "train.py"):
        return TrainRun(first[2:], logdir)
    if first[:1] != ("make",) or len(first) < 2:
        return None
    variables = dict(word.split("=", 1) for word in first[2:] if "=" in word)
    if first[1] == "train" and set(variables) <= {"ARGS"}:
        return TrainRun(tuple(shlex.split(variables.get("ARGS", ""))), logdir)
    if first[1] in CI_TARGETS and not variables and not rest and len(first) == 2:
        return "ci"
    return None


def _swept(word: str) -> int:
    """How many values a ``key=a,b,c`` override sweeps (1 when it is not a sweep)."""
    if "=" not in word or word.startswith("-"):
        return 1
    value, depth, commas = word.split("=", 1)[1], 0, 0
    for char in value:
        if char in "[{(":
            depth += 1
        elif char in "]})":
            depth -= 1
        elif char == "," and depth == 0:
            commas += 1
    return commas + 1


def shrink(args: tuple[str, ...]) -> list[str]:
    """Overrides that make a run of ``args`` one short epoch on CPU: FAST (but the command's own
    choice of a config group such as ``logger`` stays), every plugin schedule squeezed into epoch 0, iterative pruning's rounds into 2 epochs;
    as tests/test_train.py's test of every experiment does."""
    fixed = [word for word in args if word != "-m" and _swept(word) == 1]
    cfg = compose_config(fixed)
    groups = {word.lstrip("+").split("=", 1)[0] for word in args}  # logger=tensorboard stays
    overrides = [o for o in FAST if "." in o.split("=", 1)[0] or o.split("=", 1)[0] not in groups]
    scheduled = [g for g in ("sparsity", "pruning") if cfg.get(g) and "schedule" in cfg[g]]
    overrides += [f"{g}.schedule.{k}=0" for g in scheduled for k in ("begin_epoch", "end_epoch")]
    if cfg.get("sparsity") and "rounds" in cfg.sparsity:
        overrides += ["sparsity.rounds=2", "sparsity.epochs_per_round=1", "sparsity.rewind_epoch=0", "trainer.max_epochs=2"]
    return overrides


TEXT = README.read_text()
COMMANDS = readme_commands(TEXT)
RUNS = sorted({c for c in map(coverage, COMMANDS) if isinstance(c, TrainRun)}, key=lambda r: (r.args, r.logdir or ""))


def test_readme_is_a_front_page():
    assert len(TEXT.splitlines()) <= MAX_LINES
    assert ("make", "train") in COMMANDS and ("make", "test") in COMMANDS, "the two set-up commands"


def test_every_readme_command_is_run_by_this_file_or_by_ci():
    uncovered = [shlex.join(c) for c in COMMANDS if coverage(c) is None]
    assert not uncovered, f"README commands that no test and no CI step runs: {uncovered}"
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    ran = [line.split()[1] for line in ci_lines if line.startswith("make ")]
    assert ran == list(CI_TARGETS), ran
    # make train is python train.py $(ARGS): the runs below cover it.
    assert re.search(r"^train: \$\(STAMP\)\n\t\$\(PY\) train\.py \$\(ARGS\)$", (ROOT / "Makefile").read_text(), flags=re.M)


@pytest.mark.parametrize("run", RUNS, ids=lambda r: " ".join(r.args) or "(defaults)")
def test_readme_train_command_runs(tmp_path: Path, run: TrainRun):
    """The command as printed, from an empty folder: its outputs land where the README says."""
    result = run_train_cli([*run.args, *shrink(run.args)], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    if "-m" in run.args:
        sweeps = list(tmp_path.glob("outputs/*/multiruns/*"))
        assert len(sweeps) == 1, sweeps
        jobs = math.prod(_swept(word) for word in run.args)
        assert len(list(sweeps[0].glob("*/summary.json"))) == jobs
        assert (sweeps[0] / "summary.md").is_file()
    else:
        assert len(list(tmp_path.glob("outputs/*/runs/*/summary.json"))) == 1
    if run.logdir:
        assert list((tmp_path / run.logdir).rglob("events.out.tfevents.*")), f"nothing for tensorboard in {run.logdir}"


def test_readme_python_snippet_builds_its_trainer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """The "own Lightning code" snippet up to its fit (the module and data are the reader's)."""
    (snippet,) = [block for block in _fenced(TEXT, "python") if "L.Trainer(" in block]
    code, fit = snippet.rstrip().rsplit("\n", 1)
    assert fit.startswith("trainer.fit(")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    names = {type(c).__name__ for c in namespace["trainer"].callbacks}
    assert {"WeightConstraints", "HardshrinkSparsifier"} <= names


def _anchors(page: Path) -> set[str]:
    headings = re.findall(r"^#+ (.+)$", re.sub(r"^```.*?^```", "", page.read_text(), flags=re.M | re.S), flags=re.M)
    return {re.sub(r"[^\w\- ]", "", h.lower()).strip().replace(" ", "-") for h in headings}


def test_readme_links_reach_their_pages():
    for target in re.findall(r"\]\(([^)\s]+)\)", TEXT):
        if "://" in target:
            continue
        path, _, anchor = target.partition("#")
        page = ROOT / path
        assert page.exists(), target
        assert not anchor or anchor in _anchors(page), target
