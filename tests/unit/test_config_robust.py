"""While every mistake is collected, readers go on with defaults: whatever wrong value any key
of the examples holds, parsing ends in ConfigError or a valid config, never in another exception."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sidecar.config_files import KINDS
from sidecar.config_source import ConfigDoc, load_yaml_file
from sidecar.errors import ConfigError, ConfigErrors

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
WRONG: list[Any] = ["not-valid-x", -7, [{"x": 1}], {"y": 2}, True]


def _paths(node: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    if isinstance(node, dict):
        for key, value in node.items():
            yield (*prefix, key)
            yield from _paths(value, (*prefix, key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield (*prefix, i)
            yield from _paths(value, (*prefix, i))


def _set(data: Any, path: tuple[Any, ...], value: Any) -> None:
    for part in path[:-1]:
        data = data[part]
    data[path[-1]] = value


@pytest.mark.parametrize(
    ("example", "kind"),
    [("sidecar.yaml", "sidecar"), ("authz.yaml", "authz"), ("broker.yaml", "broker")],
)
def test_any_wrong_value_is_a_config_error(example: str, kind: str) -> None:
    doc = load_yaml_file(EXAMPLES / example)
    parse = KINDS[kind].parse
    parse(doc)  # the example itself is valid
    for path in list(_paths(doc)):
        for wrong in WRONG:
            data = ConfigDoc(copy.deepcopy(dict(doc)))
            data.origin = doc.origin
            _set(data, path, wrong)
            try:
                parse(data)
            except ConfigErrors as exc:
                assert all(e.where for e in exc.errors), exc
            except ConfigError:
                pass
            except Exception as exc:  # a reader's default led somewhere it should not
                pytest.fail(f"{example}: {path} = {wrong!r}: {type(exc).__name__}: {exc}")
