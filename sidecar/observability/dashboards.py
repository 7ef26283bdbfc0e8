"""The Grafana dashboard of the workload-identity indicators (README "Service level
indicators"), built with the typed builders of ``grafana-foundation-sdk`` (the ``dashboards``
extra) the way Envoy configurations are built from typed messages. Three rows: overview (SLOs
and error budget), on-call (denies, replays, refresh failures, expiry horizon, issuer outage
signals) and debug (latency histograms, cache sizes, per-upstream egress).

    python -m sidecar.observability.dashboards --write   # deploy/observability/grafana/dashboards/

A test fails when the checked-in JSON differs from what this renders, or when a query names a
series that no metric or recording rule provides.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from grafana_foundation_sdk.builders import dashboard, prometheus, stat, timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models.dashboard import DataSourceRef

DASHBOARD_DIR = Path("deploy/observability/grafana/dashboards")
#: The Prometheus data source the compose profile provisions (same uid).
DATASOURCE = DataSourceRef(type_val="prometheus", uid="prometheus")

#: (indicator, recording-rule stem, error budget = 1 - objective) of the burn-rate SLOs.
SLOS = (
    ("M1 issuance errors", "sidecar:broker_issuance_errors", 0.001),
    ("M2 issuance > 300 ms", "sidecar:broker_issuance_slow", 0.05),
    ("M3 auth denies", "sidecar:authz_denies", 0.005),
    ("M4 expired denies", "sidecar:authz_expired", 0.001),
)


def _query(expr: str, legend: str, ref: int) -> prometheus.Dataquery:
    query = prometheus.Dataquery().expr(expr).datasource(DATASOURCE).ref_id(chr(ord("A") + ref))
    return query.legend_format(legend) if legend else query


def _series(
    title: str, unit: str, *queries: tuple[str, str], width: int = 8, description: str = ""
) -> timeseries.Panel:
    panel = timeseries.Panel().title(title).unit(unit).span(width).height(8)
    panel = panel.datasource(DATASOURCE)
    if description:
        panel = panel.description(description)
    for i, (expr, legend) in enumerate(queries):
        panel = panel.with_target(_query(expr, legend, i))
    return panel


def _stat(title: str, unit: str, expr: str, legend: str = "", width: int = 6) -> stat.Panel:
    panel = stat.Panel().title(title).unit(unit).span(width).height(4).datasource(DATASOURCE)
    return panel.with_target(_query(expr, legend, 0))


def _overview(board: dashboard.Dashboard) -> dashboard.Dashboard:
    board = board.with_row(dashboard.Row("Overview: SLOs and error budget"))
    board = board.with_panel(
        _stat(
            "M1 token issuance success",
            "percentunit",
            "sidecar:broker_issuance_success:ratio_rate5m",
            "{{job}}",
        )
    )
    board = board.with_panel(
        _stat("M2 issuance p95", "s", "sidecar:broker_issuance_seconds:p95_rate5m", "{{job}}")
    )
    board = board.with_panel(
        _stat("M3 auth denies", "percentunit", "sidecar:authz_denies:ratio_rate5m", "{{job}}")
    )
    board = board.with_panel(
        _stat("M4 expired denies", "percentunit", "sidecar:authz_expired:ratio_rate5m", "{{job}}")
    )
    board = board.with_panel(
        _per_slo(
            "Error budget left over 3 days",
            "percentunit",
            "1 - {stem}:ratio_rate3d / {budget}",
            "1 - (error ratio over 3 d / budget); below 0 the objective is missed",
        )
    )
    return board.with_panel(
        _per_slo(
            "Burn rate over 1 hour",
            "none",
            "{stem}:ratio_rate1h / {budget}",
            "1 spends the budget exactly; the fast-burn alert pages at 14.4",
        )
    )


def _per_slo(title: str, unit: str, template: str, description: str) -> timeseries.Panel:
    queries = [
        (template.format(stem=stem, budget=budget), f"{name} {{{{job}}}}")
        for name, stem, budget in SLOS
    ]
    return _series(title, unit, *queries, width=12, description=description)


def _on_call(board: dashboard.Dashboard) -> dashboard.Dashboard:
    board = board.with_row(dashboard.Row("On call"))
    panels = [
        _series(
            "M3 denies by reason",
            "percentunit",
            ("sidecar:authz_denies_by_reason:ratio_rate5m", "{{job}} {{reason}}"),
        ),
        _series(
            "M6 replays, M8 credential-leak indicators (5 m)",
            "none",
            ("sidecar:proof_replays:increase5m", "replays {{instance}}"),
            ("sidecar:credential_leak_indicators:increase5m", "{{reason}} {{instance}}"),
        ),
        _series(
            "Token and JWKS refresh failures",
            "ops",
            (
                "sum by (job, code) (rate(sidecar_identity_refresh_failures_total[5m]))",
                "token {{job}} {{code}}",
            ),
            ("sidecar:jwks_refresh_failures:increase30m", "JWKS (30 m) {{instance}}"),
        ),
        _series(
            "Token expiry horizon",
            "s",
            (
                "min by (job, audience) (sidecar_identity_token_expiry_seconds)",
                "{{job}} {{audience}}",
            ),
            description="renewal happens at about half the remaining lifetime; alert below 60 s",
        ),
        _series(
            "Issuer outage signals",
            "none",
            (
                "sum by (job) (rate(sidecar_broker_issuance_total"
                '{result="temporarily_unavailable"}[5m]))',
                "broker 503/s {{job}}",
            ),
            ("sidecar:identity_renewal_success:ratio_rate5m", "renewal success {{job}}"),
            (
                "count by (job) (sidecar_identity_token_usable == 0)",
                "audiences without a usable token {{job}}",
            ),
        ),
        _series(
            "Clock offset to peers",
            "s",
            ("sidecar_clock_offset_seconds", "{{instance}} → {{peer}}"),
        ),
        _series(
            "M7 attestation failures, M10 key rotation",
            "none",
            ("sidecar:broker_attestation_failures:ratio_rate5m", "attestation failures {{job}}"),
            ("sidecar:broker_key_rotation_failures:increase1h", "rotation failures (1 h)"),
            ("sum by (event) (increase(sidecar_broker_key_events_total[1h]))", "key {{event}}"),
        ),
        _series(
            "M5 high-privilege grants (1 h)",
            "none",
            ("sidecar:broker_high_privilege_grants:increase1h", "{{audience}}"),
        ),
        _series(
            "M9 policy denies by route",
            "ops",
            ("sidecar:authz_policy_denies_by_route:rate5m", "{{job}} {{route}}"),
        ),
        _series(
            "TLS certificates in use: time to expiry",
            "s",
            (
                "min by (job, block, file) "
                "(sidecar_tls_certificate_expiry_timestamp_seconds) - time()",
                "{{job}} {{block}}.{{file}}",
            ),
            description="renewed files load within 10 s; alert below 7 days",
        ),
    ]
    for panel in panels:
        board = board.with_panel(panel)
    return board


def _quantiles(metric: str, by: str) -> list[tuple[str, str]]:
    return [
        (
            f"histogram_quantile({q}, sum by ({by}, le) (rate({metric}_bucket[5m])))",
            f"p{round(q * 100)} {{{{{by}}}}}",
        )
        for q in (0.5, 0.95, 0.99)
    ]


def _debug(board: dashboard.Dashboard) -> dashboard.Dashboard:
    board = board.with_row(dashboard.Row("Debug"))
    panels = [
        _series(
            "ext_authz check latency", "s", *_quantiles("sidecar_authz_check_seconds", "transport")
        ),
        _series(
            "Token issuance latency",
            "s",
            *_quantiles("sidecar_broker_issuance_seconds", "attestor"),
        ),
        _series(
            "Cache and store sizes",
            "none",
            ("sidecar_authz_token_cache_entries", "tokens {{instance}}"),
            ("sidecar_authz_proof_key_cache_entries", "proof keys {{instance}}"),
            ("sidecar_authz_replay_entries", "replay {{instance}}"),
            ("sidecar_jwks_keys", "JWKS keys {{instance}}"),
            ("sidecar_broker_replay_entries", "broker replay {{instance}}"),
        ),
        _series(
            "Egress requests by upstream",
            "reqps",
            (
                "sum by (upstream, status_class) (rate(sidecar_egress_requests_total[5m]))",
                "{{upstream}} {{status_class}}",
            ),
        ),
        _series(
            "Egress added latency p99",
            "s",
            (
                "histogram_quantile(0.99, sum by (upstream, le) "
                "(rate(sidecar_egress_added_latency_seconds_bucket[5m])))",
                "{{upstream}}",
            ),
        ),
        _series(
            "Egress upstream latency p99",
            "s",
            (
                "histogram_quantile(0.99, sum by (upstream, le) "
                "(rate(sidecar_egress_upstream_seconds_bucket[5m])))",
                "{{upstream}}",
            ),
        ),
    ]
    for panel in panels:
        board = board.with_panel(panel)
    return board


def overview_dashboard() -> dashboard.Dashboard:
    board = (
        dashboard.Dashboard("Workload identity sidecar")
        .uid("sidecar-slo")
        .tags(["sidecar", "workload-identity", "slo"])
        .time("now-6h", "now")
        .refresh("30s")
        .readonly()
    )
    return _debug(_on_call(_overview(board)))


def render() -> dict[str, str]:
    """{file name: JSON text} of every dashboard."""
    board = json.loads(json.dumps(overview_dashboard().build(), cls=JSONEncoder))
    for number, panel in enumerate(board["panels"], start=1):
        panel["id"] = number  # Grafana keys panel state by id: one each
    text = json.dumps(board, indent=2, sort_keys=True, ensure_ascii=False)
    return {"sidecar-slo.json": text + "\n"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", action="store_true", help=f"write into {DASHBOARD_DIR}/")
    args = parser.parse_args(argv)
    for name, text in render().items():
        if args.write:
            DASHBOARD_DIR.mkdir(parents=True, exist_ok=True)
            (DASHBOARD_DIR / name).write_text(text)
        else:
            print(text, end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
