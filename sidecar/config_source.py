"""Where configuration values come from, and where each mistake is: the file and line of a key,
or the environment variable that set it.

* :func:`load_yaml_file` reads a YAML file with a loader that keeps every node's position,
  refuses duplicate keys (naming both lines) and applies ``SIDECAR__…`` overrides.
* Overrides are strings (:class:`EnvValue`), converted by the typed readers of
  :mod:`sidecar.config_util` according to what the key holds, never parsed as YAML.
* :func:`collecting` runs a parser so that every mistake is reported at once: readers
  :func:`report` a mistake and go on with the default, :func:`keep_going` lets the next part
  of a file be checked after one part failed. The collected errors come back located
  (``file:line: key: expected …``) in one :class:`ConfigErrors`.

An error never shows a value that came from the environment or a file named by ``…_FILE``:
those are where secrets live.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from sidecar.errors import ConfigError, ConfigErrors

ENV_PREFIX = "SIDECAR__"
FILE_SUFFIX = "_FILE"
#: Keys that hold a path and end in ``_file``: ``SIDECAR__…__JWKS_FILE=/p`` sets such a key to
#: ``/p`` (as any other override); for every other key ``SIDECAR__…__X_FILE=/p`` sets ``x`` to
#: the content of ``/p`` (a Kubernetes secret mounted as a file). A test keeps this list equal
#: to the ``*_file`` keys the parsers accept.
PATH_KEYS = frozenset(
    {
        "bundle_file",
        "ca_file",
        "cert_file",
        "client_ca_file",
        "jwks_file",
        "key_file",
        "public_jwk_file",
        "secret_file",
        "state_file",
        "token_file",
    }
)
#: A value read through ``…_FILE`` larger than this is refused (a secret, not a data file).
MAX_FILE_VALUE_BYTES = 64 * 1024


class EnvValue(str):
    """An override from the environment: a string until a reader converts it; ``source`` is
    the variable's name, shown in errors instead of the value."""

    source: str

    def __new__(cls, value: str, source: str) -> EnvValue:
        obj = super().__new__(cls, value)
        obj.source = source
        return obj

    def __reduce__(self) -> tuple[Any, ...]:
        return (EnvValue, (str(self), self.source))


@dataclass
class Origin:
    """Where a document's keys are: ``lines`` by dotted path (``authz.issuers[0].issuer``),
    ``env`` the variable that overrode a path."""

    file: str
    lines: dict[str, int] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)

    def where(self, key: str) -> tuple[str, bool]:
        """(``file:line`` or the variable's name, whether the value came from the environment)
        for an error's key: the key itself, else the nearest enclosing key that is known."""
        for path in _enclosing(key):
            for env_path, name in self.env.items():
                if path == env_path or path.startswith((env_path + ".", env_path + "[")):
                    return name, True
            if path in self.lines:
                return f"{self.file}:{self.lines[path]}", False
        return self.file, False


class ConfigDoc(dict[str, Any]):
    """A loaded configuration: a plain mapping that also knows its :class:`Origin`."""

    origin: Origin


def _enclosing(key: str) -> Iterator[str]:
    path = key
    while path:
        yield path
        cut = max(path.rfind("."), path.rfind("["))
        if cut <= 0:
            return
        path = path[:cut]


# -- YAML with positions ------------------------------------------------------------------------


def _walk(node: yaml.Node, path: str, origin: Origin, dupes: list[ConfigError]) -> None:
    if isinstance(node, yaml.MappingNode):
        seen: dict[str, int] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.value == "<<":
                continue
            name = str(key_node.value)
            child = f"{path}.{name}" if path else name
            line = key_node.start_mark.line + 1
            if name in seen:
                dupes.append(
                    ConfigError(
                        child,
                        f"each key once (also set at line {seen[name]}): remove one of the two",
                    )
                )
                dupes[-1].where = f"{origin.file}:{line}"
                continue
            seen[name] = line
            origin.lines[child] = line
            _walk(value_node, child, origin, dupes)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            child = f"{path}[{i}]"
            origin.lines[child] = item.start_mark.line + 1
            _walk(item, child, origin, dupes)


def parse_yaml(text: str, file: str) -> ConfigDoc:
    """The document in ``text`` (named ``file`` in errors), its positions recorded; duplicate
    keys are refused, every one of them in one :class:`ConfigErrors`."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{file}:{mark.line + 1}" if mark is not None else file
        # The problem only: the YAML library's context quotes the file's text.
        problem = getattr(exc, "problem", None) or type(exc).__name__
        error = ConfigError("config file", f"valid YAML ({problem})")
        error.where = where
        raise ConfigErrors([error]) from None
    finally:
        loader.dispose()
    if data is None:
        data = {}
    if not isinstance(data, dict):
        error = ConfigError("config file", "a YAML mapping at the top level")
        error.where = file
        raise ConfigErrors([error])
    doc = ConfigDoc(data)
    doc.origin = Origin(file)
    dupes: list[ConfigError] = []
    if node is not None:
        _walk(node, "", doc.origin, dupes)
    if dupes:
        raise ConfigErrors(dupes)
    return doc


# -- environment overrides -----------------------------------------------------------------------


def _read_value_file(path: str, name: str, dotted: str) -> str:
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_FILE_VALUE_BYTES + 1)
    except OSError as exc:
        raise ConfigError(dotted, f"a readable file in {name} ({exc.strerror}: {path})") from None
    if len(raw) > MAX_FILE_VALUE_BYTES:
        raise ConfigError(dotted, f"a file of at most {MAX_FILE_VALUE_BYTES} bytes in {name}")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(dotted, f"a UTF-8 text file in {name}") from None
    # One trailing line break is how files end (and how `kubectl create secret` leaves them).
    return text.removesuffix("\n").removesuffix("\r")


def apply_env_overrides(data: dict[str, Any], environ: Mapping[str, str] | None = None) -> None:
    """``SIDECAR__AUTHZ__GRPC__LISTEN=127.0.0.1:9999`` sets ``authz.grpc.listen`` to that
    string; ``SIDECAR__AUTHZ__REPLAY__REDIS_URL_FILE=/run/secrets/redis`` sets
    ``authz.replay.redis_url`` to that file's content. The readers convert the strings by what
    each key holds (numbers, booleans, durations, comma-separated lists)."""
    env = os.environ if environ is None else environ
    origin = data.origin if isinstance(data, ConfigDoc) else None
    for name in sorted(env):
        if not name.startswith(ENV_PREFIX):
            continue
        path = [p.lower() for p in name[len(ENV_PREFIX) :].split("__") if p]
        if not path:
            continue
        value = env[name]
        if name.endswith(FILE_SUFFIX) and path[-1] not in PATH_KEYS:
            path[-1] = path[-1][: -len(FILE_SUFFIX)]
            if not path[-1]:
                continue
            value = _read_value_file(value, name, ".".join(path))
        dotted = ".".join(path)
        node = data
        for depth, part in enumerate(path[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                parent = ".".join(path[: depth + 1])
                raise ConfigError(parent, f"a mapping to override into (from {name})")
            node = child
        node[path[-1]] = EnvValue(value, name)
        if origin is not None:
            origin.env[dotted] = name


_ENV_TAG = "$sidecar_env"


def to_json_ready(data: Any) -> Any:
    """``data`` for ``json.dumps`` keeping which strings are overrides (JSON would make them
    plain strings, which the readers no longer convert): the authz workers get the parent's
    configuration this way."""
    if isinstance(data, EnvValue):
        return {_ENV_TAG: [data.source, str(data)]}
    if isinstance(data, dict):
        return {k: to_json_ready(v) for k, v in data.items()}
    if isinstance(data, list):
        return [to_json_ready(v) for v in data]
    return data


def from_json_object(obj: dict[str, Any]) -> Any:
    """``json.loads`` object hook undoing :func:`to_json_ready`."""
    tagged = obj.get(_ENV_TAG) if len(obj) == 1 else None
    if isinstance(tagged, list) and len(tagged) == 2 and all(isinstance(t, str) for t in tagged):
        return EnvValue(tagged[1], tagged[0])
    return obj


def load_yaml_file(path: str | Path) -> ConfigDoc:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError("config file", f"a readable file ({exc.strerror})", str(path)) from None
    except UnicodeDecodeError:
        raise ConfigError("config file", "a UTF-8 text file", str(path)) from None
    doc = parse_yaml(text, str(path))
    apply_env_overrides(doc)
    return doc


# -- every mistake at once -----------------------------------------------------------------------

_collected: ContextVar[list[ConfigError] | None] = ContextVar("config_errors", default=None)

#: Keys whose values are not shown even when they come from the file.
_SECRET_KEY = re.compile(r"(secret|password)[^.\[]*$")


def report(error: ConfigError) -> None:
    """A mistake the reader can go on after (it returns the default): recorded while
    :func:`collecting`, raised otherwise."""
    errors = _collected.get()
    if errors is None:
        raise error
    errors.append(error)


@contextmanager
def keep_going() -> Iterator[None]:
    """Around a part of a file (a section, a list item) whose failure must not hide the
    mistakes of the parts after it: while :func:`collecting`, a ConfigError raised inside is
    recorded and the caller goes on."""
    try:
        yield
    except ConfigError as exc:
        errors = _collected.get()
        if errors is None:
            raise
        errors.extend(exc.errors if isinstance(exc, ConfigErrors) else [exc])


T = TypeVar("T")


def or_default(default: T, parse: Callable[[], T]) -> T:
    """``parse()``; while :func:`collecting`, ``default`` after recording its ConfigError."""
    with keep_going():
        return parse()
    return default


def locate(errors: list[ConfigError], data: object) -> ConfigErrors:
    """Every error with its place in ``data`` (a :class:`ConfigDoc`), never echoing a value
    that came from the environment or a secret-named key."""
    origin = data.origin if isinstance(data, ConfigDoc) else None
    for error in errors:
        if origin is not None and error.where is None:
            error.where, from_env = origin.where(error.key)
            error.hide_value = error.hide_value or from_env
        if _SECRET_KEY.search(error.key):
            error.hide_value = True
    # In the file's order (an operator fixes a file top to bottom), then the environment's.
    return ConfigErrors(sorted(errors, key=_line_of))


def _line_of(error: ConfigError) -> int:
    _, _, line = (error.where or "").rpartition(":")
    return int(line) if line.isdigit() else 1 << 30


@contextmanager
def collecting(data: object) -> Iterator[None]:
    """Run the parser inside to the end of the file, then raise every mistake it found in one
    :class:`ConfigErrors` (located in ``data``)."""
    errors: list[ConfigError] = []
    token = _collected.set(errors)
    try:
        with keep_going():
            yield
    finally:
        _collected.reset(token)
    if errors:
        raise locate(_unique(errors), data)


def _unique(errors: list[ConfigError]) -> list[ConfigError]:
    seen: set[str] = set()
    out = []
    for error in errors:
        text = str(error)
        if text not in seen:
            seen.add(text)
            out.append(error)
    return out
