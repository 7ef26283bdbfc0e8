"""`sidecar envoy-config` numeric options: one range check, each option's own message."""

from __future__ import annotations

import pytest

from sidecar.envoy_command import MAX_AUTHZ_WORKERS, build_parser


@pytest.mark.parametrize(
    ("option", "good", "bad", "message"),
    [
        ("--authz-timeout-ms", "250", "3600001", "expected milliseconds, a whole number 1-3600000"),
        ("--authz-workers", "3", "0", f"expected a whole number 1-{MAX_AUTHZ_WORKERS} "),
        ("--authz-workers", "2", "two", "(the sidecar's authz.workers), got 'two'"),
    ],
)
def test_whole_number_options(
    option: str, good: str, bad: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    parser = build_parser()
    dest = option.lstrip("-").replace("-", "_")
    assert getattr(parser.parse_args(["--mode", "grpc", option, good]), dest) == int(good)
    with pytest.raises(SystemExit):
        parser.parse_args(["--mode", "grpc", option, bad])
    assert message in capsys.readouterr().err
