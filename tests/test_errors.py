"""The error tree: errors.py's docstring draws exactly the classes it defines, every exception
class lives there, and node routes raise ForgeErrors (aiohttp's own are translated once)."""

from __future__ import annotations

import ast
import builtins
import re
import types
from dataclasses import dataclass
from pathlib import Path

import pytest

from forge_cli import errors

REPO = Path(__file__).resolve().parent.parent
CONTINUATION_COLUMN = 30  # a tree line whose text starts this far right continues a description
LINE = re.compile(r"(?P<prefix>(?:[│ ]   )*)(?P<branch>[├└]── )?(?P<name>[A-Z]\w*)"
                  r"(?:\s+(?P<exit>\d)\s+(?P<http>\d{3}))?(?:\s+(?P<desc>.*))?$")
# Exception classes another part of issue 11 is moving: the node-client rewrite brings
# forge_cli/client.py's into errors.py and deletes tui/client.py. Drop these entries then.
@dataclass
class Drawn:
    name: str
    parent: str | None
    exit_code: int | None
    http_status: int | None
    description: str


def parse_tree(doc: str) -> list[Drawn]:
    """The classes drawn in a docstring: the lines after the `exit HTTP` header up to the first
    line that is neither blank nor indented."""
    lines = doc.splitlines()
    start = next(i for i, line in enumerate(lines) if line.split() == ["exit", "HTTP"])
    drawn: list[Drawn] = []
    parents: list[str] = []  # the open branch, one name per depth
    for raw in lines[start + 1:]:
        if raw.strip() and not raw.startswith("    "):
            break
        line = raw[4:]
        if not line.strip():
            continue
        column = len(line) - len(line.lstrip(" │├└─"))
        if column >= CONTINUATION_COLUMN:
            assert drawn, f"a description continues before any class: {raw!r}"
            drawn[-1].description += " " + line.strip(" │")
            continue
        match = LINE.match(line)
        assert match, f"cannot read this line of the error tree: {raw!r}"
        depth = len(match["prefix"]) // 4 + (1 if match["branch"] else 0)
        assert depth <= len(parents), f"{match['name']} is indented under nothing"
        del parents[depth:]
        drawn.append(Drawn(match["name"], parents[-1] if parents else None,
                           int(match["exit"]) if match["exit"] else None,
                           int(match["http"]) if match["http"] else None,
                           match["desc"] or ""))
        parents.append(match["name"])
    return drawn


def tree_mismatches(module: types.ModuleType) -> list[str]:
    """Every way the module's docstring tree differs from the classes the module defines."""
    defined = {name: cls for name, cls in vars(module).items()
               if isinstance(cls, type) and issubclass(cls, BaseException)
               and cls.__module__ == module.__name__}
    drawn = parse_tree(module.__doc__ or "")
    problems: list[str] = []
    names = [d.name for d in drawn]
    problems += [f"{n} is drawn twice" for n in sorted({n for n in names if names.count(n) > 1})]
    problems += [f"{n} is defined but not drawn" for n in sorted(set(defined) - set(names))]
    problems += [f"{n} is drawn but not defined" for n in sorted(set(names) - set(defined))]
    for d in drawn:
        cls = defined.get(d.name)
        if cls is None:
            continue
        first, *others = cls.__bases__
        if d.parent is None:
            if any(first is c for c in defined.values()):
                problems.append(f"{d.name} is drawn as a root but derives from {first.__name__}")
        elif first.__name__ != d.parent:
            problems.append(f"{d.name} is drawn under {d.parent} but derives from "
                            f"{first.__name__}")
        for other in others:
            if f"also a {other.__name__}" not in d.description:
                problems.append(f"{d.name} also derives from {other.__name__}; its line must "
                                f"say 'also a {other.__name__}'")
        if issubclass(cls, errors.ForgeError) and (d.exit_code is None or d.http_status is None):
            problems.append(f"{d.name} is a ForgeError drawn without its exit code and status")
        if d.exit_code is not None and d.exit_code != getattr(cls, "exit_code", None):
            problems.append(f"{d.name} is drawn with exit {d.exit_code}, has "
                            f"{getattr(cls, 'exit_code', None)}")
        if d.http_status is not None and d.http_status != getattr(cls, "http_status", None):
            problems.append(f"{d.name} is drawn with HTTP {d.http_status}, has "
                            f"{getattr(cls, 'http_status', None)}")
        if not (cls.__doc__ or "").strip():
            problems.append(f"{d.name} has no docstring")
    return problems


def test_errors_docstring_draws_exactly_the_class_hierarchy():
    assert tree_mismatches(errors) == []


def _module(doc: str, source: str) -> types.ModuleType:
    module = types.ModuleType("fake_errors", doc)
    exec(compile(source, "fake_errors", "exec"), module.__dict__)  # noqa: S102
    return module


FAKE_DOC = """Errors.

                        exit HTTP
    ForgeError          2    400  base
    ├── UsageError      2    400  bad input
    │   └── Gone        2    404  not there, described at length so that the line
    │                             goes on here
    └── Denied          1    403  refused
"""
FAKE_SOURCE = '''
from forge_cli.errors import ForgeError as _Base
class ForgeError(_Base):
    """base"""
class UsageError(ForgeError):
    """bad input"""
class Gone(UsageError):
    """not there"""
    http_status = 404
class Denied(ForgeError):
    """refused"""
    exit_code = 1
    http_status = 403
'''


def test_tree_check_reads_a_correct_tree_and_its_continuation_lines():
    module = _module(FAKE_DOC, FAKE_SOURCE)
    assert tree_mismatches(module) == []
    gone = next(d for d in parse_tree(FAKE_DOC) if d.name == "Gone")
    assert gone.parent == "UsageError" and gone.http_status == 404
    assert gone.description.endswith("goes on here")


@pytest.mark.parametrize(("doc", "source", "expected"), [
    (FAKE_DOC, FAKE_SOURCE + 'class Extra(ForgeError):\n    """new"""\n',
     "Extra is defined but not drawn"),
    (FAKE_DOC.replace("    └── Denied          1    403  refused\n", ""), FAKE_SOURCE,
     "Denied is defined but not drawn"),
    (FAKE_DOC, FAKE_SOURCE.replace("class Gone(UsageError)", "class Gone(ForgeError)"),
     "Gone is drawn under UsageError but derives from ForgeError"),
    (FAKE_DOC, FAKE_SOURCE.replace("http_status = 404", "http_status = 410"),
     "Gone is drawn with HTTP 404, has 410"),
    (FAKE_DOC, FAKE_SOURCE.replace("    exit_code = 1\n", ""), "Denied is drawn with exit 1, has 2"),
    (FAKE_DOC.replace("Denied          1    403", "Denial          1    403"), FAKE_SOURCE,
     "Denial is drawn but not defined"),
], ids=["unlisted-class", "removed-line", "wrong-parent", "wrong-status", "wrong-exit",
        "renamed"])
def test_tree_check_fails_when_the_tree_and_the_classes_disagree(doc, source, expected):
    assert expected in tree_mismatches(_module(doc, source))


def _python_files(*roots: str) -> list[Path]:
    return sorted(p for root in roots for p in (REPO / root).rglob("*.py"))


def test_every_exception_class_lives_in_errors_py():
    known = {name for name, value in vars(builtins).items()
             if isinstance(value, type) and issubclass(value, BaseException)}
    known |= {name for name, value in vars(errors).items()
              if isinstance(value, type) and issubclass(value, BaseException)}
    classes = []
    for path in _python_files("forge_cli", "tui"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ClassDef):
                bases = [b.id if isinstance(b, ast.Name) else b.attr
                         for b in node.bases if isinstance(b, (ast.Name, ast.Attribute))]
                classes.append((path.relative_to(REPO).as_posix(), node.name, bases))
    found = set()
    for _ in range(10):  # to a fixed point: exception classes deriving from exception classes
        for where, name, bases in classes:
            if any(b in known or b.endswith(("Error", "Exception")) for b in bases):
                found.add((where, name))
                known.add(name)
    elsewhere = sorted(f"{where}: {name}" for where, name in found
                       if where != "forge_cli/errors.py")
    assert elsewhere == []


def _http_exception_uses(tree: ast.AST) -> list[int]:
    """Lines naming aiohttp's web.HTTP… outside an `except` clause's type."""
    allowed: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ExceptHandler) and node.type is not None:
            allowed |= {id(sub) for sub in ast.walk(node.type)}
    lines = []
    for node in ast.walk(tree):
        named = (isinstance(node, ast.Attribute) and node.attr.startswith("HTTP")) or \
            (isinstance(node, ast.ImportFrom) and node.module in ("aiohttp.web", "aiohttp")
             and any(a.name.startswith("HTTP") for a in node.names))
        if named and id(node) not in allowed:
            lines.append(node.lineno)
    return lines


def test_no_node_module_raises_aiohttp_http_exceptions():
    uses = {path.relative_to(REPO).as_posix(): _http_exception_uses(ast.parse(path.read_text()))
            for path in _python_files("forge_cli/node")}
    assert {where: lines for where, lines in uses.items() if lines} == {}


def test_the_http_exception_check_sees_a_raise():
    tree = ast.parse("from aiohttp import web\n"
                     "try:\n    pass\nexcept web.HTTPException:\n    raise\n"
                     "raise web.HTTPForbidden(reason='no')\n")
    assert _http_exception_uses(tree) == [6]
