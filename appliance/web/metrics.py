"""The `/metrics` route (METRICS_TOKEN, an API key or a session; METRICS_ALLOWED_NETWORKS) and
the request timing hooks. The counters themselves are `appliance.core.metrics`.

Access: open like the rest of the API, unless API keys are required (then an API key or an
admin session), or `METRICS_TOKEN` is set (then that token, an API key or an admin session).
`METRICS_ALLOWED_NETWORKS` restricts it to the monitoring host(s) by client address.
"""

from __future__ import annotations

import hmac
import ipaddress
import time
from typing import TYPE_CHECKING, Any

from prometheus_client import CONTENT_TYPE_PLAIN_0_0_4
from quart import Blueprint, Quart, Response, current_app, g, request
from quart_schema import hide

from appliance.core.metrics import METHODS, Metrics, label

if TYPE_CHECKING:
    from appliance.web.services import Services

blueprint = Blueprint("metrics", __name__)


# --- for other modules ------------------------------------------------------------------------
def metrics_of(services: Services) -> Metrics:
    """The app's metrics (owned by its model manager)."""
    return services.models.metrics


def bind(services: Services, live: Any = None) -> None:
    """Point the gauges at the running job queue, models and live sessions (at start-up)."""
    metrics_of(services).bind(jobs=services.jobs, models=services.models, live=live)


def wyoming_request(services: Services, kind: str = "transcribe", outcome: str = "ok") -> None:
    """Count one Wyoming request: `kind` describe/transcribe (or connection: a protocol error
    outside a request), `outcome` ok or an error code
    (an outcome other than ok also counts in `whisper_errors_total{component="wyoming"}`)."""
    metrics = metrics_of(services)
    metrics.wyoming_requests.labels(label(kind), label(outcome)).inc()
    if outcome != "ok":
        metrics.error("wyoming", outcome)


# --- the route and the request hooks --------------------------------------------------------
def _services() -> Services | None:
    result: Services | None = current_app.extensions.get("appliance")
    return result


def _bearer() -> str | None:
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


async def _refused(s: Services) -> Response | None:
    """None when this request may read the metrics, else the error response."""
    from appliance.web.errors import error_response
    from appliance.web.security import client_ip, current_session, get_auth

    settings = s.settings
    if settings.metrics_allowed_networks:
        try:
            address = ipaddress.ip_address(client_ip(request))
        except ValueError:
            address = None
        if address is None or not any(address in n for n in settings.metrics_allowed_networks):
            return error_response(
                403,
                "forbidden",
                "/metrics is open only to the monitoring hosts (METRICS_ALLOWED_NETWORKS)",
            )
    token = settings.metrics_token
    if not token and not s.runtime.require_api_key:
        return None
    given = _bearer()
    if given and token and hmac.compare_digest(given.encode(), token.encode()):
        return None
    if given and await get_auth().verify_key(given):
        return None
    if await current_session(request) is not None:
        return None
    return error_response(
        401,
        "unauthorized",
        "/metrics needs Authorization: Bearer <METRICS_TOKEN or an API key>",
        {"WWW-Authenticate": 'Bearer realm="whisper-appliance"'},
    )


@blueprint.get("/metrics")
@hide
async def metrics() -> Response:
    """Prometheus metrics (text format)."""
    s = _services()
    if s is None:
        return Response("starting\n", status=503, content_type="text/plain")
    refused = await _refused(s)
    if refused is not None:
        return refused
    body = metrics_of(s).render()
    return Response(body, status=200, content_type=CONTENT_TYPE_PLAIN_0_0_4)


def init_app(app: Quart) -> None:
    """The /metrics route, and the request timing hooks (register first: see below)."""
    app.register_blueprint(blueprint)

    # registered before the security guard's hook, so a refused request is timed too
    @app.before_request
    async def _start_timer() -> None:
        g.metrics_started = time.perf_counter()

    @app.after_request
    async def _count(response: Response) -> Response:
        s = _services()
        if s is None:
            return response
        m = metrics_of(s)
        rule = request.url_rule.rule if request.url_rule is not None else "none"
        method = request.method if request.method in METHODS else "other"
        status = response.status_code
        m.http_requests.labels(rule, method, str(status)).inc()
        started = g.get("metrics_started")
        if started is not None:
            m.http_duration.labels(rule, method).observe(time.perf_counter() - started)
        if status >= 500:
            m.error("http", status)
        return response
