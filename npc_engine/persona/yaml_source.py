"""YAML → Python values plus the line of every key, with the limits a writer-facing loader needs.

PyYAML's constructors forget where values came from, silently keep the last of two duplicate
keys and expand aliases without limit; none of the well-known YAML libraries gives all three
of line maps, duplicate-key errors and an alias-expansion budget, so this small walker over
PyYAML's node graph does.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

MAX_FILE_BYTES = 256 * 1024
MAX_NODES = 20_000
# libyaml's composer, where PyYAML was built with it: ~17x faster on the sample world
# (0.07 s of every engine start and `validate`). It stops at 1,000 levels by itself.
_COMPOSER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
MAX_DEPTH = 50  # a persona is a few levels deep; deeper is a mistake or an attack

Location = tuple[str | int, ...]


@dataclass
class SourceProblem:
    line: int
    field: str
    message: str


@dataclass
class ParsedYaml:
    data: Any = None
    lines: dict[Location, int] = field(default_factory=dict)
    problems: list[SourceProblem] = field(default_factory=list)

    def line_of(self, location: Location) -> int:
        """Line of the deepest known part of ``location`` (1 for the document)."""
        for end in range(len(location), -1, -1):
            line = self.lines.get(tuple(location[:end]))
            if line is not None:
                return line
        return 1


class _NodeBudgetExceeded(Exception):
    """The document expands to more than MAX_NODES values (an alias bomb, usually)."""


class _Unreadable(Exception):
    """A value nested too deeply or containing itself (through an alias)."""

    def __init__(self, node: yaml.Node, location: Location, message: str) -> None:
        super().__init__(message)
        self.line = node.start_mark.line + 1
        self.location = location


class _Walker:
    def __init__(self, parsed: ParsedYaml) -> None:
        self.parsed = parsed
        self.loader = yaml.SafeLoader("")
        self.nodes_seen = 0
        self._open: set[int] = set()  # collections being walked: an alias back is a cycle

    def value(self, node: yaml.Node, location: Location) -> Any:
        self.nodes_seen += 1
        if self.nodes_seen > MAX_NODES:
            raise _NodeBudgetExceeded
        if len(location) > MAX_DEPTH:
            raise _Unreadable(node, location, f"nested more than {MAX_DEPTH} levels deep")
        self.parsed.lines.setdefault(location, node.start_mark.line + 1)
        if not isinstance(node, (yaml.MappingNode, yaml.SequenceNode)):
            return self.loader.construct_object(node, deep=True)
        if id(node) in self._open:
            raise _Unreadable(node, location, "an alias refers to the value that contains it")
        self._open.add(id(node))
        try:
            if isinstance(node, yaml.MappingNode):
                return self.mapping(node, location)
            return [self.value(item, (*location, index)) for index, item in enumerate(node.value)]
        finally:
            self._open.discard(id(node))

    def mapping(self, node: yaml.MappingNode, location: Location) -> dict[Any, Any]:
        self.loader.flatten_mapping(node)  # resolves YAML merge keys (<<)
        result: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            key = self.loader.construct_object(key_node, deep=True)
            if not isinstance(key, (str, int, float, bool)) or key is None:
                self.parsed.problems.append(
                    SourceProblem(
                        key_node.start_mark.line + 1, dotted(location), "keys must be plain text"
                    )
                )
                continue
            child: Location = (*location, str(key))
            if str(key) in result:
                self.parsed.problems.append(
                    SourceProblem(
                        key_node.start_mark.line + 1,
                        dotted(child),
                        f"duplicate key (first given on line {self.parsed.lines.get(child, '?')})",
                    )
                )
                continue
            self.parsed.lines[child] = key_node.start_mark.line + 1
            result[str(key)] = self.value(value_node, child)
        return result


def dotted(location: Location) -> str:
    text = ""
    for part in location:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else part)
    return text or "(document)"


def parse_yaml_file(path: Path) -> ParsedYaml:
    """Read and parse ``path``; every problem lands in ``problems`` instead of raising."""
    parsed = ParsedYaml()
    try:
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:
            parsed.problems.append(
                SourceProblem(
                    1,
                    "(document)",
                    f"file is {size:,} bytes; persona files are limited to {MAX_FILE_BYTES:,}",
                )
            )
            return parsed
        raw = path.read_bytes()
    except OSError as exc:
        parsed.problems.append(SourceProblem(1, "(document)", f"cannot read file: {exc.strerror}"))
        return parsed
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        parsed.problems.append(
            SourceProblem(
                line,
                "(document)",
                f"file is not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start}); "
                "save it as UTF-8",
            )
        )
        return parsed
    try:
        documents = list(yaml.compose_all(text, Loader=_COMPOSER))
    except RecursionError:  # PyYAML's composer recurses once per nesting level
        parsed.problems.append(
            SourceProblem(1, "(document)", f"nested more than {MAX_DEPTH} levels deep")
        )
        return parsed
    except yaml.YAMLError as exc:
        if "maximum nesting depth" in str(getattr(exc, "problem", "")):  # libyaml's own limit
            parsed.problems.append(
                SourceProblem(1, "(document)", f"nested more than {MAX_DEPTH} levels deep")
            )
            return parsed
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else 1
        problem = getattr(exc, "problem", None) or str(exc)
        parsed.problems.append(SourceProblem(line, "(document)", f"invalid YAML: {problem}"))
        return parsed
    documents = [doc for doc in documents if doc is not None]
    if not documents:
        parsed.problems.append(SourceProblem(1, "(document)", "file is empty"))
        return parsed
    if len(documents) > 1:
        parsed.problems.append(
            SourceProblem(
                documents[1].start_mark.line + 1,
                "(document)",
                "file holds several YAML documents (---); put one character per file",
            )
        )
        return parsed
    root = documents[0]
    if not isinstance(root, yaml.MappingNode):
        kind = "a list" if isinstance(root, yaml.SequenceNode) else "a single value"
        parsed.problems.append(
            SourceProblem(
                root.start_mark.line + 1,
                "(document)",
                f"expected a mapping of fields (name: …, role: …), found {kind}",
            )
        )
        return parsed
    walker = _Walker(parsed)
    try:
        parsed.data = walker.value(root, ())
    except _NodeBudgetExceeded:
        parsed.data = None
        parsed.problems.append(
            SourceProblem(
                1,
                "(document)",
                f"file expands to more than {MAX_NODES:,} values (YAML aliases nested too deep?)",
            )
        )
    except _Unreadable as exc:
        parsed.data = None
        parsed.problems.append(SourceProblem(exc.line, dotted(exc.location), str(exc)))
    except yaml.YAMLError as exc:
        parsed.data = None
        parsed.problems.append(SourceProblem(1, "(document)", f"invalid YAML: {exc}"))
    return parsed
