"""The ``connections`` sections: defaults per listener kind, and errors that name the key."""

from __future__ import annotations

import pytest

from sidecar.authz.config import parse_authz_config
from sidecar.broker.config import parse_broker_config
from sidecar.egress.config import parse_egress_config
from sidecar.errors import ConfigError
from sidecar.net_limits import (
    ATTESTATION_LIMITS,
    EGRESS_LIMITS,
    GRPC_LIMITS,
    HTTP_LIMITS,
    ConnLimits,
    busy_response,
    parse_conn_limits,
)

EGRESS = {"upstreams": [{"listen": "127.0.0.1:1", "upstream": "http://h", "audience": "a"}]}


def test_defaults_per_listener() -> None:
    assert parse_egress_config(EGRESS).connections == EGRESS_LIMITS
    assert EGRESS_LIMITS.body_timeout == 0  # uploads stream: only a stalled one is cut
    authz = parse_authz_config({"audience": "a", "issuers": [{"issuer": "http://i"}]})
    assert authz.http_connections == HTTP_LIMITS
    assert authz.grpc_connections == GRPC_LIMITS == ConnLimits(1024, 10.0, 10.0, 60.0)
    broker = parse_broker_config({})
    assert broker.http_connections == HTTP_LIMITS
    assert broker.attestation_connections == ATTESTATION_LIMITS
    assert ATTESTATION_LIMITS.max_per_uid and ATTESTATION_LIMITS.header_timeout == 5


def test_values_are_read() -> None:
    limits = parse_conn_limits(
        {
            "max_connections": 8,
            "max_per_uid": 2,
            "header_timeout": 1.5,
            "body_timeout": 0,
            "idle_timeout": 3,
        },
        "attestation.connections",
        ATTESTATION_LIMITS,
    )
    assert limits == ConnLimits(8, 1.5, 0.0, 3.0, 2)
    # The sweep runs often enough for the shortest deadline, and never busier than 50 Hz.
    assert limits.sweep_interval == pytest.approx(1.5 / 4)
    assert ConnLimits(header_timeout=0.01).sweep_interval == 0.02


@pytest.mark.parametrize(
    ("section", "default", "key"),
    [
        ({"max_per_uid": 4}, HTTP_LIMITS, "x.connections.max_per_uid"),  # TCP: no peer uid
        ({"max_connections": 0}, HTTP_LIMITS, "x.connections.max_connections"),
        ({"header_timeout": 0}, HTTP_LIMITS, "x.connections.header_timeout"),
        ({"idle_timeout": -1}, HTTP_LIMITS, "x.connections.idle_timeout"),
        ({"body_timeout": "5 minutes"}, HTTP_LIMITS, "x.connections.body_timeout"),
        ({"max_connections": 4, "max_per_uid": 5}, ATTESTATION_LIMITS, "x.connections.max_per_uid"),
    ],
)
def test_errors_name_the_key(section: dict[str, object], default: ConnLimits, key: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_conn_limits(section, "x.connections", default)
    assert err.value.key == key


def test_grpc_connections_are_read_and_only_for_the_loop_engine() -> None:
    base = {"audience": "a", "issuers": [{"issuer": "http://i"}]}
    grpc = {"connections": {"max_connections": 5, "idle_timeout": 2}}
    cfg = parse_authz_config({**base, "grpc": grpc})
    assert cfg.grpc_connections == ConnLimits(5, 10.0, 10.0, 2.0)
    assert cfg.http_connections == HTTP_LIMITS
    # grpcio's engines are not guarded: a limit that would not hold is refused at load.
    with pytest.raises(ConfigError) as err:
        parse_authz_config({**base, "grpc": {**grpc, "engine": "threads"}})
    assert err.value.key == "authz.grpc.connections"


def test_busy_response_is_complete_http() -> None:
    raw = busy_response("max_per_uid")
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 503 Service Unavailable\r\n")
    assert f"Content-Length: {len(body)}".encode() in head
    assert b"Connection: close" in head and b"Retry-After: 1" in head
    assert b'"temporarily_unavailable"' in body and b"max_per_uid" in body
