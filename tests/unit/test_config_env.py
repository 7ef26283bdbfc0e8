"""``SIDECAR__…`` overrides: strings typed by what the key holds (never YAML), ``…_FILE``
variants for mounted secrets, and no error ever showing a value from the environment.
Durations: one parser for every duration key."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from sidecar.broker.config import parse_broker_config
from sidecar.config_files import parse_authz_file, parse_run_file
from sidecar.config_source import PATH_KEYS, apply_env_overrides, load_yaml_file
from sidecar.config_util import parse_duration
from sidecar.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
#: Looks like YAML (a comment, a flow list, a mapping) and must survive as one string.
SECRET = "s3cret #not-a-comment [a, b]: {c: d}"


def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for name in [n for n in os.environ if n.startswith("SIDECAR__")]:
        monkeypatch.delenv(name)


def test_a_secret_is_taken_as_written(monkeypatch: pytest.MonkeyPatch) -> None:
    _clean_env(monkeypatch)
    monkeypatch.setenv("SIDECAR__AUTHZ__NONCE__SECRET", SECRET)
    cfg = parse_authz_file(load_yaml_file(EXAMPLES / "authz.yaml")).authz
    assert cfg.nonce_secret == SECRET.encode()


def test_secret_file_variant(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _clean_env(monkeypatch)
    (tmp_path / "nonce").write_text(SECRET + "\n")
    monkeypatch.setenv("SIDECAR__AUTHZ__NONCE__SECRET_FILE", str(tmp_path / "nonce"))
    cfg = parse_authz_file(load_yaml_file(EXAMPLES / "authz.yaml")).authz
    assert cfg.nonce_secret == SECRET.encode()  # one trailing newline removed, nothing else


def test_path_keys_ending_in_file_keep_their_path(tmp_path: Path) -> None:
    data: dict[str, object] = {}
    apply_env_overrides(data, {"SIDECAR__KEYS__KEY_FILE": "/no/such/key.pem"})
    assert data == {"keys": {"key_file": "/no/such/key.pem"}}


def test_file_variant_of_a_key_without_one(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _clean_env(monkeypatch)
    url = "redis://:p#ss [w0rd]@127.0.0.1:6379/0"
    (tmp_path / "redis-url").write_text(url + "\n")
    monkeypatch.setenv("SIDECAR__AUTHZ__REPLAY__BACKEND", "redis")
    monkeypatch.setenv("SIDECAR__AUTHZ__REPLAY__REDIS_URL_FILE", str(tmp_path / "redis-url"))
    assert parse_authz_file(load_yaml_file(EXAMPLES / "authz.yaml")).authz.redis_url == url


def test_unreadable_value_file_names_the_variable(tmp_path: Path) -> None:
    name = "SIDECAR__AUTHZ__REPLAY__REDIS_URL_FILE"
    with pytest.raises(ConfigError) as info:
        apply_env_overrides({}, {name: str(tmp_path / "none")})
    assert str(info.value).startswith("authz.replay.redis_url: expected a readable file in " + name)


def test_path_keys_are_the_documented_file_keys() -> None:
    text = (ROOT / "README.md").read_text()
    reference = text[text.index("## Configuration reference") : text.index("## SPIFFE")]
    documented = set(re.findall(r"`[\w.\[\]]*?(\w+_file)`", reference))
    assert documented == PATH_KEYS, (
        "config_source.PATH_KEYS must list every documented key ending in _file (a path): "
        f"missing {sorted(documented - PATH_KEYS)}, extra {sorted(PATH_KEYS - documented)}"
    )


def test_values_are_typed_by_the_key(monkeypatch: pytest.MonkeyPatch) -> None:
    _clean_env(monkeypatch)
    for name, value in {
        "SIDECAR__AUTHZ__LEEWAY": "250ms",
        "SIDECAR__AUTHZ__TOKEN_CACHE_SIZE": "42",
        "SIDECAR__AUTHZ__HTTP__ENABLED": "no",
        "SIDECAR__AUTHZ__AUDIENCES": "spiffe://a.example/x, spiffe://a.example/y",
        "SIDECAR__AUTHZ__DPOP__MAX_AGE": "2m",
        "SIDECAR__AUTHZ__WORKERS": "1",
        "SIDECAR__AUTHZ__GRPC__LISTEN": "127.0.0.1:9999",
    }.items():
        monkeypatch.setenv(name, value)
    cfg = parse_authz_file(load_yaml_file(EXAMPLES / "authz.yaml")).authz
    assert cfg.settings.leeway == 0.25
    assert cfg.settings.token_cache_size == 42
    assert cfg.http_listen is None
    assert cfg.settings.audiences == {"spiffe://a.example/x", "spiffe://a.example/y"}
    assert cfg.settings.dpop.max_age == 120
    assert str(cfg.grpc_listen) == "127.0.0.1:9999"


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (5, 5.0),
        (0.25, 0.25),
        ("5", 5.0),
        ("1.5", 1.5),
        ("250ms", 0.25),
        ("5s", 5.0),
        ("5m", 300.0),
        ("1h", 3600.0),
        (" 2m ", 120.0),
        (".5s", 0.5),
    ],
)
def test_durations(value: object, seconds: float) -> None:
    assert parse_duration(value) == seconds


@pytest.mark.parametrize("value", [True, None, "", "5 m", "5min", "-1s", "1d", "ms", [5]])
def test_not_durations(value: object) -> None:
    assert parse_duration(value) is None


def test_every_duration_key_takes_units(tmp_path: Path) -> None:
    path = tmp_path / "broker.yaml"
    path.write_text(
        "tokens: {ttl: 5m, wit_ttl: 1h, subject_leeway: 30s}\n"
        "keys: {rotate_every: 1h, prepublish: 10m, retire_grace: 1m, jwks_max_age: 1m}\n"
        "revocation: {max_wait: 30s}\nconnections: {header_timeout: 500ms}\n"
    )
    cfg = parse_broker_config(load_yaml_file(path))
    assert (cfg.token_ttl, cfg.wit_ttl, cfg.subject_leeway) == (300, 3600, 30)
    assert cfg.keys.schedule.rotate_every == 3600 and cfg.keys.jwks_max_age == 60
    assert cfg.revocation_max_wait == 30 and cfg.http_connections.header_timeout == 0.5
    run = tmp_path / "sidecar.yaml"
    run.write_text(
        (EXAMPLES / "sidecar.yaml").read_text() + "\n# appended by the test\n"
        if False
        else "identity:\n  attestor: {type: unix, timeout: 1500ms}\n"
        "  refresh: {min_interval: 2s, backoff_max: 1m, request_wait: 250ms}\n"
        "egress:\n  timeouts: {connect: 2s, total: 5m, read: 1m}\n  keepalive_timeout: 30s\n"
    )
    rc = parse_run_file(load_yaml_file(run))
    assert rc.identity is not None and rc.egress is not None
    assert rc.identity.attestor.timeout == 1.5 and rc.identity.policy.backoff_max == 60
    assert rc.identity.policy.request_wait == 0.25
    assert (rc.egress.timeouts.connect, rc.egress.timeouts.total) == (2, 300)


# Every kind of reader, given the secret: its error must name the variable, never the value.
SECRET_TARGETS = [
    ("authz", "SIDECAR__AUTHZ__LEEWAY"),  # duration
    ("authz", "SIDECAR__AUTHZ__TOKEN_CACHE_SIZE"),  # integer
    ("authz", "SIDECAR__AUTHZ__HTTP__ENABLED"),  # boolean
    ("authz", "SIDECAR__AUTHZ__DPOP__ALGORITHMS"),  # list of choices
    ("authz", "SIDECAR__AUTHZ__GRPC__ENGINE"),  # choice
    ("authz", "SIDECAR__AUTHZ__GRPC__LISTEN"),  # listener
    ("authz", "SIDECAR__AUTHZ__REVOCATION__URL"),  # URL
    ("authz", "SIDECAR__AUTHZ__WORKERS"),  # integer or auto
    ("authz", "SIDECAR__AUTHZ__REVOCATION__WAIT"),  # whole seconds
    ("authz", "SIDECAR__AUTHZ__NONCE"),  # a section
    ("authz", "SIDECAR__AUTHZ__ISSUERS"),  # a list of sections
    ("authz", "SIDECAR__AUTHZ__HTTP__PATH_PREFIX"),
    ("authz", "SIDECAR__ADMIN__LISTEN"),
    ("broker", "SIDECAR__ISSUER"),
    ("broker", "SIDECAR__LISTEN"),
    ("broker", "SIDECAR__KEYS__ALGORITHM"),
    ("broker", "SIDECAR__CLUSTERS"),
    ("broker", "SIDECAR__ENTRIES"),
    ("broker", "SIDECAR__ATTESTATION__SOCKET"),
    ("broker", "SIDECAR__TOKENS__TTL"),
    ("sidecar", "SIDECAR__IDENTITY__ISSUER"),
    ("sidecar", "SIDECAR__IDENTITY__ATTESTOR__TYPE"),
    ("sidecar", "SIDECAR__EGRESS__UPSTREAMS"),
    ("sidecar", "SIDECAR__EGRESS__VIA"),
    ("sidecar", "SIDECAR__EGRESS__TIMEOUTS__TOTAL"),
    ("sidecar", "SIDECAR__IDENTITY__REFRESH__JITTER"),
]
SECRET_PARTS = ("hunter2", "s3cr3t")
SECRET_LIKE = "hunter2-s3cr3t #[x, y]"
EXAMPLE_OF = {"authz": "authz.yaml", "broker": "broker.yaml", "sidecar": "sidecar.yaml"}


@pytest.mark.parametrize(("kind", "name"), SECRET_TARGETS)
def test_no_error_shows_a_secret(
    kind: str, name: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from sidecar.config_files import KINDS

    _clean_env(monkeypatch)
    monkeypatch.setenv(name, SECRET_LIKE)
    with pytest.raises(ConfigError) as info:
        KINDS[kind].parse(load_yaml_file(EXAMPLES / EXAMPLE_OF[kind]))
    shown = f"{info.value}\n{info.value!r}\n{caplog.text}"
    assert name in str(info.value), str(info.value)
    assert not any(part in shown for part in SECRET_PARTS), shown


@pytest.mark.integration  # runs the command line as a process
def test_no_error_shows_a_secret_from_the_command_line() -> None:
    for kind in EXAMPLE_OF:
        env = {name: SECRET_LIKE for k, name in SECRET_TARGETS if k == kind}
        proc = subprocess.run(
            [sys.executable, "-m", "sidecar", "check", "-c", str(EXAMPLES / EXAMPLE_OF[kind])],
            capture_output=True,
            text=True,
            timeout=60,
            env={"PATH": "/usr/bin:/bin", **env},
        )
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        assert sum(name in proc.stderr for name in env) >= len(env) // 2, proc.stderr
        assert not any(part in proc.stderr + proc.stdout for part in SECRET_PARTS), proc.stderr


def test_unlocated_errors_hide_override_values_too() -> None:
    # A parser called on a plain mapping (a reload, a test) has no file positions; a value
    # from the environment, alone or split into a list, is still never shown.
    from sidecar.config_util import get_algorithms, get_int

    data: dict[str, object] = {}
    apply_env_overrides(data, {"SIDECAR__A__ALGS": "ES256,hunter2", "SIDECAR__A__N": "s3cr3t"})
    section = data["a"]
    assert isinstance(section, dict)
    for read in (
        lambda: get_algorithms(section, "algs", "a", ["ES256"]),
        lambda: get_int(section, "n", "a", 1),
    ):
        with pytest.raises(ConfigError) as info:
            read()
        shown = f"{info.value} {info.value!r}"
        assert "SIDECAR__A__" in shown and not any(p in shown for p in SECRET_PARTS), shown


def test_workers_get_overrides_still_typed_by_the_key(monkeypatch: pytest.MonkeyPatch) -> None:
    # The authz parent hands its configuration to each worker as JSON: an override must reach
    # the worker as an override, or "42" would be refused there as "not an integer".
    import io

    from sidecar.authz.config import parse_authz_config
    from sidecar.authz.workers import WorkerSettings

    _clean_env(monkeypatch)
    monkeypatch.setenv("SIDECAR__AUTHZ__TOKEN_CACHE_SIZE", "42")
    monkeypatch.setenv("SIDECAR__AUTHZ__LEEWAY", "2s")
    data = load_yaml_file(EXAMPLES / "authz.yaml")
    sent = WorkerSettings(dict(data), 0, 2, "/tmp/x").encode()
    got = WorkerSettings.read(io.BytesIO(sent))
    cfg = parse_authz_config(got.data["authz"])
    assert (cfg.settings.token_cache_size, cfg.settings.leeway) == (42, 2.0)
