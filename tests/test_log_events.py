"""Log event names: one scheme (``area.what``) across faxd, and every event documented for operators.

Operators grep and alert on the ``event`` of a log line, so it is a stable name, never a sentence: the
human text goes into a field (``detail``, ``reason``, ...). This reads the source of every faxd module
(no daemon is run): each call of a logger's ``debug``/``info``/``warning``/``error``/``exception``/
``critical`` with its event name, also through a name bound to one of them (``level = log.info if ...
else log.warning``). Each name must follow the scheme and have its row, with its level, in the event
tables of docs/operations.md §4 (the simulator's events are listed in docs/simulator.md instead); every
row there must name an event the code still logs.
"""

from __future__ import annotations

import ast
import re
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "faxd"
OPERATIONS = ROOT / "docs" / "operations.md"
SIMULATOR = ROOT / "docs" / "simulator.md"

#: ``area.what``: lowercase words with underscores, one dot.
EVENT = re.compile(r"^[a-z][a-z0-9_]*\.[a-z][a-z0-9_]*$")
LEVELS = frozenset({"debug", "info", "warning", "error", "exception", "critical"})
#: ``log.exception`` logs at level error (with the traceback).
DOC_LEVEL = {"exception": "error"}
#: Modules of the simulator's own program: their events are listed in docs/simulator.md.
SIM = ("faxd/sim/",)


@dataclass(frozen=True)
class LogCall:
    module: str
    line: int
    level: str
    event: str | None  # None: the first argument is not a string literal

    def where(self) -> str:
        return f"{self.module}:{self.line}"


def _is_logger_factory(call: ast.expr) -> bool:
    """``structlog.get_logger(...)``, ``faxd.logs.get_logger(...)`` or ``logging.getLogger(...)``."""
    if not isinstance(call, ast.Call):
        return False
    func = call.func
    name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
    return name in ("get_logger", "getLogger")


def _loggers(tree: ast.Module) -> set[str]:
    """Module-level names bound to a logger."""
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.Assign) and _is_logger_factory(node.value):
            names |= {t.id for t in node.targets if isinstance(t, ast.Name)}
        elif (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and node.value is not None
            and _is_logger_factory(node.value)
        ):
            names.add(node.target.id)
    return names


def log_calls(path: Path, root: Path = ROOT) -> Iterator[LogCall]:
    """Every logging call of the module at ``path``; raises AssertionError on a level method that is
    used in a way this reader cannot follow (so no event can slip past it)."""
    module = path.relative_to(root).as_posix()
    tree = ast.parse(path.read_text(), filename=module)
    loggers = _loggers(tree)
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}

    def level_of(node: ast.AST) -> str | None:
        if (
            isinstance(node, ast.Attribute)
            and node.attr in LEVELS
            and isinstance(node.value, ast.Name)
            and node.value.id in loggers
        ):
            return node.attr
        return None

    # Names bound to level methods: ``level = log.info if quiet else log.warning``.
    aliases: dict[str, set[str]] = defaultdict(set)
    followed: set[ast.AST] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            options = (
                [node.value.body, node.value.orelse] if isinstance(node.value, ast.IfExp) else [node.value]
            )
            levels = [level_of(option) for option in options]
            if all(levels):
                aliases[node.targets[0].id] |= {lv for lv in levels if lv}
                followed |= set(options)
    for node in ast.walk(tree):
        level = level_of(node)
        if level is None or node in followed:
            continue
        parent = parents.get(node)
        unfollowed = f"{module}:{node.lineno}: {ast.unparse(node)} is used other than as a call; " + (
            "call it with the event name, or extend this test to follow it"
        )
        assert isinstance(parent, ast.Call), unfollowed
        assert parent.func is node, unfollowed
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        if (level := level_of(node.func)) is not None:
            levels = {level}
        elif isinstance(node.func, ast.Name) and node.func.id in aliases:
            levels = aliases[node.func.id]
        else:
            continue
        first = node.args[0] if node.args else None
        event = first.value if isinstance(first, ast.Constant) and isinstance(first.value, str) else None
        for lv in sorted(levels):
            yield LogCall(module, node.lineno, lv, event)


MODULES = sorted(PACKAGE.rglob("*.py"))


def _calls() -> list[LogCall]:
    return [call for path in MODULES for call in log_calls(path)]


def _documented(path: Path, section: str | None) -> dict[str, set[str]]:
    """Event name -> levels, from the rows of the tables (first cell: one `name`) in ``section``
    of the document (the whole document when None)."""
    text = path.read_text()
    if section is not None:
        start = text.index(section)
        end = text.find("\n## ", start + len(section))
        text = text[start : end if end >= 0 else len(text)]
    rows: dict[str, set[str]] = {}
    for line in text.splitlines():
        match = re.match(r"^\| `([^`]+)` \| ([^|]+) \|", line)
        if match:
            name, levels = match.groups()
            assert name not in rows, f"{path.name}: two rows for {name}"
            rows[name] = {lv.strip() for lv in re.split(r"[/,]| or ", levels) if lv.strip()}
    return rows


def _operations_rows() -> dict[str, set[str]]:
    return _documented(OPERATIONS, "## 4. Logs")


# ------------------------------------------------------------------------------------------- the reader


def test_the_reader_finds_calls_aliases_and_non_literal_names(tmp_path: Path) -> None:
    """The scan this file relies on sees direct calls, calls through an alias, and names that are not
    literals; and it refuses a level method it cannot follow."""
    pkg = tmp_path / "faxd"
    pkg.mkdir()
    source = pkg / "x.py"
    source.write_text(
        "import structlog\n"
        "log = structlog.get_logger(__name__)\n"
        "def f(name, quiet):\n"
        "    log.info('a.started', detail='x')\n"
        "    log.exception(\n        'b.failed')\n"
        "    level = log.info if quiet else log.warning\n"
        "    level('c.maybe')\n"
        "    log.error(name)\n"
        "    parser.error('not a logger')\n"
    )
    calls = list(log_calls(source, tmp_path))
    source.write_text("import structlog\nlog = structlog.get_logger()\nemit = [log.info]\n")
    with pytest.raises(AssertionError, match="used other than as a call"):
        list(log_calls(source, tmp_path))
    assert [(c.line, c.level, c.event) for c in calls] == [
        (4, "info", "a.started"),
        (5, "exception", "b.failed"),
        (8, "info", "c.maybe"),
        (8, "warning", "c.maybe"),
        (9, "error", None),
    ]


def test_the_reader_sees_faxds_logging() -> None:
    """Every module that makes a logger logs through calls this reader sees (a sanity check: an empty
    scan would pass every other test here)."""
    calls = _calls()
    modules = {c.module for c in calls}
    for module in ("faxd/daemon.py", "faxd/adapters/event_server.py", "faxd/adapters/ws_session.py"):
        assert module in modules
    assert len({c.event for c in calls}) > 50


# ------------------------------------------------------------------------------------------- the names


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_event_names_follow_the_scheme(path: Path) -> None:
    calls = list(log_calls(path))
    bad = [c for c in calls if c.event is None or not EVENT.match(c.event)]
    assert not [c for c in bad if c.event is None], [
        f"{c.where()}: the event must be a string literal" for c in bad if c.event is None
    ]
    assert not bad, [f"{c.where()}: {c.event!r} is not area.what" for c in bad]


def test_every_event_of_the_daemon_is_in_the_operations_guide_with_its_level() -> None:
    rows = _operations_rows()
    missing: list[str] = []
    wrong_level: list[str] = []
    for call in _calls():
        if call.module.startswith(SIM) or call.event is None:
            continue
        level = DOC_LEVEL.get(call.level, call.level)
        if call.event not in rows:
            missing.append(f"{call.event} ({call.where()}, {level})")
        elif level not in rows[call.event]:
            wrong_level.append(
                f"{call.event}: {level} in {call.where()}, docs say {sorted(rows[call.event])}"
            )
    assert not missing, f"add a row to docs/operations.md §4 for: {sorted(set(missing))}"
    assert not wrong_level, wrong_level


def test_every_documented_event_is_still_logged() -> None:
    logged = {c.event for c in _calls()}
    stale = sorted(set(_operations_rows()) - logged)
    assert not stale, f"docs/operations.md §4 lists events nothing logs any more: {stale}"


def test_the_simulators_events_are_in_its_guide() -> None:
    text = SIMULATOR.read_text()
    calls = [c for c in _calls() if c.module.startswith(SIM) and c.event and EVENT.match(c.event)]
    missing = sorted({f"{c.event} ({c.where()})" for c in calls if f"`{c.event}`" not in text})
    assert not missing, f"docs/simulator.md does not mention: {missing}"
