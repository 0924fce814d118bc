"""Reading a config file's YAML with limits, so that a hostile or careless file fails in a line, at once.

YAML aliases let a few hundred bytes stand for gigabytes (nine levels of nine-item lists of aliases is 9^9
items), a recursive alias makes a value that contains itself, and 20,000 nested brackets overflow the
composer's recursion. A config needs none of that: it is a few sections a few levels deep. So the loader
refuses more than MAX_ALIASES aliases, nesting deeper than MAX_DEPTH (counted through aliases, too), a value
that expands to more than MAX_NODES items, a recursive alias, and a file larger than MAX_BYTES; a device or a
FIFO is refused before it is opened. Duplicate keys are errors, not silently last-wins.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import yaml

from daemon.config_errors import ConfigError, issue, key_path
from daemon.paths import file_kind

MAX_BYTES = 1 << 20
MAX_ALIASES = 16
MAX_DEPTH = 32
MAX_NODES = 10_000


class Refused(yaml.YAMLError):
    def __init__(self, problem: str, mark=None):
        super().__init__(problem)
        self.problem, self.problem_mark = problem, mark


class BoundedLoader(yaml.SafeLoader):
    """yaml.SafeLoader that counts aliases and nesting while it composes the document."""

    def __init__(self, stream):
        super().__init__(stream)
        self._aliases = 0
        self._depth = 0

    def compose_node(self, parent, index):
        mark = self.peek_event().start_mark
        if self.check_event(yaml.AliasEvent):
            self._aliases += 1
            if self._aliases > MAX_ALIASES:
                raise Refused(f"more than {MAX_ALIASES} aliases (*name): a config needs few, and many can "
                              "expand to gigabytes", mark)
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise Refused(f"nested deeper than {MAX_DEPTH} levels", mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def _check_expansion(root: yaml.Node) -> None:
    """What the aliases expand to: no cycle, at most MAX_DEPTH deep and MAX_NODES items in all."""
    sizes: dict[int, tuple[int, int]] = {}  # id(node) -> (items, height), so that shared nodes are walked once
    walking: set[int] = set()

    def walk(node: yaml.Node, depth: int) -> tuple[int, int]:
        if id(node) in walking:
            raise Refused("a recursive alias (a value that contains itself)", node.start_mark)
        if id(node) not in sizes:
            if depth > MAX_DEPTH:
                raise Refused(f"nested deeper than {MAX_DEPTH} levels once its aliases are expanded", node.start_mark)
            children = ([n for pair in node.value for n in pair] if isinstance(node, yaml.MappingNode)
                        else node.value if isinstance(node, yaml.SequenceNode) else [])
            walking.add(id(node))
            items, height = 1, 0
            for child in children:
                n, h = walk(child, depth + 1)
                items, height = items + n, max(height, h + 1)
                if items > MAX_NODES:
                    raise Refused(f"expands to more than {MAX_NODES} values (aliases repeating aliases)",
                                  node.start_mark)
            walking.discard(id(node))
            sizes[id(node)] = (items, height)
        items, height = sizes[id(node)]
        if depth + height > MAX_DEPTH:
            raise Refused(f"nested deeper than {MAX_DEPTH} levels once its aliases are expanded", node.start_mark)
        return items, height

    walk(root, 0)


def _read_text(path: Path) -> str:
    try:
        mode = os.stat(path).st_mode
        if not stat.S_ISREG(mode):  # never opened: reading /dev/zero never ends, opening a FIFO blocks
            raise ConfigError([issue("", f"{path} is {file_kind(mode)}, not a regular file")], path)
        with open(path, "rb") as f:
            data = f.read(MAX_BYTES + 1)
        if len(data) > MAX_BYTES:
            raise ConfigError([issue("", f"{path} is larger than {MAX_BYTES >> 20} MiB: not a config file")], path)
        return data.decode("utf-8")
    except FileNotFoundError:
        raise ConfigError([issue("", f"config file {path} does not exist: pass --config FILE, or create "
                                     "ROOT/config/daemon.yaml (the shipped config/daemon.yaml is a commented "
                                     "starting point)")], path) from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError([issue("", f"cannot read {path}: {e}")], path) from None


def read_yaml(path: Path) -> tuple[dict, dict[tuple, int]]:
    """The mapping in `path` and the line of every key."""
    loader = BoundedLoader(_read_text(path))
    try:
        node = loader.get_single_node()
        if node is not None:
            _check_expansion(node)
        data = loader.construct_document(node) if node is not None else {}
    except Refused as e:
        where = f" at line {e.problem_mark.line + 1}, column {e.problem_mark.column + 1}" if e.problem_mark else ""
        raise ConfigError([issue("", f"YAML refused{where}: {e.problem}")], path) from None
    except ValueError as e:  # a scalar the constructor cannot convert, like a 5,000-digit number
        raise ConfigError([issue("", f"YAML value refused: {str(e)[:200]}")], path) from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e)
        raise ConfigError([issue("", f"YAML syntax error{where}: {problem}")], path) from None
    finally:
        loader.dispose()
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError([issue("", "the file must be a mapping of keys (like `base_model: ...`)",
                                 data, line=1)], path)
    lines: dict[tuple, int] = {}
    dupes: list[dict] = []
    _walk(node, (), lines, dupes)
    if dupes:
        raise ConfigError(dupes, path)
    return data, lines


def _walk(node, loc: tuple, lines: dict, dupes: list) -> None:
    if not isinstance(node, yaml.MappingNode):
        return
    for key_node, value_node in node.value:
        loc2 = loc + (key_node.value,)
        if loc2 in lines:
            dupes.append(issue(key_path(loc2), f"given twice (first at line {lines[loc2]})",
                               line=key_node.start_mark.line + 1))
        lines[loc2] = key_node.start_mark.line + 1
        _walk(value_node, loc2, lines, dupes)
