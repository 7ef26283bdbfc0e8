"""Every admin ``/metrics`` carries the process collectors and ``sidecar_build_info`` with the
installed version (issue 11.9), once however many apps share a registry."""

from __future__ import annotations

import asyncio
import importlib.metadata

from aiohttp import web
from aiohttp.test_utils import make_mocked_request
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from sidecar.observability.admin import make_admin_app


def scrape(app: web.Application) -> dict[str, list[tuple[dict[str, str], float]]]:
    async def get() -> bytes:
        request = make_mocked_request("GET", "/metrics", app=app)
        match = await app.router.resolve(request)
        response = await match.handler(request)
        assert isinstance(response, web.Response) and response.body is not None
        body = response.body
        assert isinstance(body, bytes)
        return body

    text = asyncio.run(get()).decode()
    return {
        family.name: [(s.labels, s.value) for s in family.samples]
        for family in text_string_to_metric_families(text)
    }


def test_metrics_carry_process_platform_and_build_info() -> None:
    registry = CollectorRegistry()
    families = scrape(make_admin_app(registry, lambda: (True, "ok")))
    version = importlib.metadata.version("workload-identity-sidecar")
    assert families["sidecar_build_info"] == [({"version": version}, 1.0)]
    for name in (
        "process_cpu_seconds",
        "process_resident_memory_bytes",
        "process_open_fds",
        "process_start_time_seconds",
    ):
        assert families[name] and families[name][0][1] > 0, name
    assert families["python_info"][0][0]["implementation"]


def test_a_second_admin_app_on_the_same_registry_registers_nothing_twice() -> None:
    registry = CollectorRegistry()
    make_admin_app(registry, lambda: (True, "ok"))
    families = scrape(make_admin_app(registry, lambda: (True, "ok")))
    assert len(families["sidecar_build_info"]) == 1
