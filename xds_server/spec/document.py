"""A spec file's bytes -> a plain document (mappings, lists, scalars): UTF-8, then YAML
through PyYAML's safe loader, bounded against files that are valid YAML but hostile
(nesting thousands deep, aliases that repeat a value billions of times). Every failure is
a `SpecError` whose one problem says where (line and column) and what is wrong.
"""

from __future__ import annotations

import re
from typing import Any

import yaml

from xds_server.spec.checker import one_line, shown
from xds_server.spec.model import SpecError, SpecProblem

MAX_DEPTH = 100
"""How deeply collections may nest, aliases followed. The deepest field of a real spec is
about 7 levels down (services[0].rollout.analysis.metrics.NAME.field), so 100 refuses
nothing a person writes; it stops a corrupted or hostile file long before PyYAML's
recursive composer (about 3 stack frames a level) reaches Python's recursion limit, and
before the checker's messages repr a value nested thousands deep."""
MAX_ALIASED = 1_000_000
"""How many values aliases may add by repetition (a 'billion laughs' file is a few lines
that would make one error message print billions of them)."""


def utf8_text(data: bytes, source: str) -> str:
    """The file's text; SpecError when it is not UTF-8 (where the first bad byte is)."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SpecError(source, [_not_utf8(data, exc)]) from None


def load_document(text: str, source: str) -> Any:
    """The YAML document; SpecError for YAML that does not parse or that is refused."""
    try:
        return _load_yaml(text)
    except yaml.YAMLError as exc:
        raise SpecError(source, [_yaml_problem(exc, text)]) from None


def _not_utf8(data: bytes, exc: UnicodeDecodeError) -> SpecProblem:
    line = data.count(b"\n", 0, exc.start) + 1
    line_start = data.rfind(b"\n", 0, exc.start) + 1
    column = len(data[line_start : exc.start].decode("utf-8", "replace")) + 1
    return SpecProblem(
        f"line {line}, column {column}",
        f"not UTF-8 text: byte 0x{data[exc.start]:02x} at offset {exc.start} ({exc.reason}); "
        "a spec is a UTF-8 YAML file",
    )


class _Refused(yaml.MarkedYAMLError):
    """Valid YAML this loader will not build (too deep, aliases repeating too much)."""


class _SpecLoader(yaml.SafeLoader):
    """PyYAML's safe loader, bounded: nesting deeper than MAX_DEPTH is refused while it is
    composed (before the recursion gets deep), and a scalar its tag cannot read (a date
    like 2024-13-45, an integer past Python's 4,300 digits, `!!int x`) is a YAML error at
    its line instead of a ValueError from inside PyYAML."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.depth = 0
        self.aliased = False

    def compose_node(self, parent: yaml.Node | None, index: int) -> yaml.Node | None:
        if not self.check_event(yaml.SequenceStartEvent, yaml.MappingStartEvent):
            self.aliased = self.aliased or self.check_event(yaml.AliasEvent)
            return super().compose_node(parent, index)
        if self.depth >= MAX_DEPTH:
            mark = self.peek_event().start_mark  # type: ignore[no-untyped-call]
            raise _Refused(None, None, f"nesting deeper than {MAX_DEPTH} levels", mark)
        self.depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1

    def construct_object(self, node: Any, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep)
        except yaml.YAMLError:
            raise
        except Exception as exc:  # whatever a tag's constructor raises on a bad scalar
            tag = str(node.tag).replace("tag:yaml.org,2002:", "!!")
            value = node.value if isinstance(node, yaml.ScalarNode) else "a collection"
            reason = f" ({str(exc).split(';')[0]})" if isinstance(exc, ValueError) else ""
            raise yaml.constructor.ConstructorError(
                None, None, f"{shown(value)} is not a valid {tag}{reason}", node.start_mark
            ) from None


def _load_yaml(text: str) -> Any:
    loader = _SpecLoader(text)  # (a ReaderError here: a character YAML does not allow)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        if loader.aliased:
            _check_aliases(node)
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _check_aliases(root: yaml.Node) -> None:
    """Refuse what aliases make of a document the composer let through: nesting deeper
    than MAX_DEPTH, a collection inside itself, more than MAX_ALIASED repeated values.
    Iterative, each node once."""
    depth: dict[int, int] = {}  # by id(node): collections nested at and below it
    size: dict[int, int] = {}  # by id(node): values, aliases expanded (capped)
    open_: set[int] = set()  # the collections on the current path
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, closing = stack.pop()
        kids = _children(node)
        if closing:
            open_.discard(id(node))
            below = max((depth[id(k)] for k in kids), default=0)
            depth[id(node)] = below + isinstance(node, yaml.CollectionNode)
            size[id(node)] = min(1 + sum(size[id(k)] for k in kids), 2 * MAX_ALIASED)
            if depth[id(node)] > MAX_DEPTH:
                msg = f"nesting deeper than {MAX_DEPTH} levels (aliases followed)"
                raise _Refused(None, None, msg, node.start_mark)
        elif id(node) in open_:
            msg = "an alias inside this collection refers to it: endless nesting"
            raise _Refused(None, None, msg, node.start_mark)
        elif id(node) not in depth:
            open_.add(id(node))
            stack.append((node, True))
            stack.extend((k, False) for k in kids)
    if size[id(root)] - len(size) > MAX_ALIASED:
        msg = f"aliases repeat more than {MAX_ALIASED:,} values"
        raise _Refused(None, None, msg, root.start_mark)


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    return list(node.value) if isinstance(node, yaml.SequenceNode) else []


def _yaml_problem(exc: yaml.YAMLError, text: str) -> SpecProblem:
    """One line for a YAML error: where, what, and what PyYAML was reading there."""
    if isinstance(exc, yaml.reader.ReaderError):
        before = text[: exc.position]
        line = len(_LINE_BREAK.findall(before)) + 1
        column = len(_LINE_BREAK.split(before)[-1]) + 1
        return SpecProblem(
            f"line {line}, column {column}",
            f"not valid YAML: character #x{exc.character:04x} is not allowed ({exc.reason})",
        )
    if not isinstance(exc, yaml.MarkedYAMLError):
        return SpecProblem("", one_line(f"not valid YAML: {exc}"))
    where = _at(exc.problem_mark)
    message = exc.problem or str(exc)
    if exc.context:
        context_at = _at(exc.context_mark)
        shown_at = f" at {context_at}" if context_at and context_at != where else ""
        message += f" ({exc.context}{shown_at})"
    prefix = "" if isinstance(exc, _Refused) else "not valid YAML: "
    return SpecProblem(where, one_line(prefix + message))


_LINE_BREAK = re.compile("\r\n|[\n\r\x85\u2028\u2029]")
"""What YAML counts as a line break (its marks count lines the same way)."""


def _at(mark: yaml.Mark | None) -> str:
    return "" if mark is None else f"line {mark.line + 1}, column {mark.column + 1}"
