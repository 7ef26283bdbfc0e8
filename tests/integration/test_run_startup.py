"""``sidecar run`` start-up, in process over real sockets: what it leaves behind for the
request path."""

from __future__ import annotations

import asyncio
import gc
from pathlib import Path

import pytest

from sidecar import runtime


class _Frozen(Exception):
    pass


def test_run_freezes_its_startup_heap_once_every_part_is_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Full collections under load must not walk start-up's objects again (issue 9: one such
    pass cost the egress proxy ~18 µs a request over a 5 s run). On a regression ``serve``
    never freezes and runs until the timeout instead."""
    from sidecar.run_command import serve

    seen: list[tuple[int, bool]] = []
    real = runtime.freeze_startup_heap

    def freeze() -> None:
        real()
        seen.append((gc.get_freeze_count(), (tmp_path / "dpop.jwk.json").exists()))
        gc.unfreeze()  # leave this test process as it was
        raise _Frozen

    monkeypatch.setattr(runtime, "freeze_startup_heap", freeze)
    data = {
        "identity": {
            "attestor": {"type": "file", "path": str(tmp_path / "token.jwt")},
            "public_jwk_file": str(tmp_path / "dpop.jwk.json"),
        },
        "egress": {
            "upstreams": [
                {
                    "name": "orders",
                    "listen": "127.0.0.1:0",
                    "upstream": "http://127.0.0.1:9",
                    "audience": "https://orders.example",
                }
            ]
        },
        "admin": {"listen": "127.0.0.1:0"},
    }
    with pytest.raises(_Frozen):
        asyncio.run(asyncio.wait_for(serve(data), 20))
    assert len(seen) == 1
    frozen, published = seen[0]
    assert frozen > 0 and published
