"""Strict YAML for stampline's files (recipes, station configurations).

PyYAML's ``SafeLoader``, made strict: a mapping that names a key twice is refused (PyYAML keeps
the last one silently), as is an alias (``*name``: stampline's files never need one, and code
that walks a structure of aliases can be made to do exponential work). Every refusal is one
sentence naming the file and the line; the file is read bounded and decoded as strict UTF-8.
"""

from __future__ import annotations

import os
from typing import Any

import yaml
from yaml.constructor import ConstructorError
from yaml.nodes import MappingNode, Node, ScalarNode

from stampline.errors import UsageError, shown
from stampline.files import read_text_bounded

_MERGE = "tag:yaml.org,2002:merge"


class _Refusal(yaml.YAMLError):
    """A strictness rule broken at ``line`` (1-based); ``problem`` completes the sentence."""

    def __init__(self, line: int, problem: str) -> None:
        super().__init__(problem)
        self.line, self.problem = line, problem


class _StrictLoader(yaml.SafeLoader):
    def compose_node(self, parent: Node | None, index: Any) -> Node | None:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise _Refusal(event.start_mark.line + 1, "uses a YAML alias (*name), which stampline does not accept")
        return super().compose_node(parent, index)  # type: ignore[no-any-return]

    def construct_object(self, node: Node, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep)
        except (ValueError, OverflowError) as exc:  # an impossible date, a number of 5,000 digits, ...
            if isinstance(exc, yaml.YAMLError):
                raise
            raise ConstructorError(None, None, "a value cannot be read", node.start_mark) from None

    def construct_mapping(self, node: Node, deep: bool = False) -> dict[Any, Any]:
        if isinstance(node, MappingNode):
            first_line: dict[Any, int] = {}
            for key_node, _ in node.value:
                if not isinstance(key_node, ScalarNode) or key_node.tag == _MERGE:
                    continue
                key = self.construct_object(key_node)
                line = key_node.start_mark.line + 1
                if key in first_line:
                    raise _Refusal(line, f"repeats the key '{shown(str(key), 40)}' "
                                         f"(first named at line {first_line[key]})")
                first_line[key] = line
        return super().construct_mapping(node, deep)  # type: ignore[no-any-return]


def parse(text: str, where: str) -> Any:
    """The document in ``text``; ``where`` (the file) starts every error sentence."""
    try:
        return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 (a SafeLoader)
    except _Refusal as exc:
        raise UsageError(f"{where}: line {exc.line} {exc.problem}.") from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise UsageError(f"{where} is not valid YAML{at}.") from None
    except yaml.reader.ReaderError as exc:  # a character YAML does not allow (a NUL, a control character)
        line = text.count("\n", 0, exc.position) + 1
        raise UsageError(f"{where} is not valid YAML at line {line}: it holds a character YAML does not allow.") \
            from None
    except yaml.YAMLError:
        raise UsageError(f"{where} is not valid YAML.") from None
    except RecursionError:
        raise UsageError(f"{where} is nested too deeply to be a stampline file.") from None


def parse_mapping(text: str, where: str) -> dict[Any, Any]:
    """``parse``, refusing a document that is not a mapping (an empty file included)."""
    raw = parse(text, where)
    if not isinstance(raw, dict):
        raise UsageError(f"{where} must be a mapping.")
    return raw


def load_mapping(path: str | os.PathLike[str], limit: int, what: str) -> dict[Any, Any]:
    """The mapping in the YAML file ``path`` (at most ``limit`` bytes of UTF-8)."""
    return parse_mapping(read_text_bounded(path, limit, what), shown(str(path), 160))
