"""What every request passes through: security headers, CORS, API keys and rate limits.

- Headers on every response: a CSP without inline script, `nosniff`, `Referrer-Policy`,
  `frame-ancestors 'none'`, and HSTS only when the request came over HTTPS.
- CORS is off unless the origin is in the allowed origins (runtime setting, env default
  `ALLOWED_ORIGINS`); no credentials are ever allowed cross-origin.
- With "require an API key" on, `/transcribe`, `/v1/*`, `/api/*`, `/ws/live`, `/asr` and
  `/detect-language` need `Authorization: Bearer <key>` or a logged-in admin session;
  otherwise 401 (`/v1/realtime` checks after accepting: an OpenAI `error` event).
- Transcription requests (and live sessions) take a token from the bucket of their API key,
  or of their client IP without one: 429 + `Retry-After` when empty.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Iterable
from urllib.parse import urlsplit

from quart import Quart, Response, current_app, g, request, websocket
from quart.wrappers import Request as _Request
from quart.wrappers import Websocket

from appliance.core import auth as auth_mod
from appliance.core.auth import Auth, Session
from appliance.system.config import Network
from appliance.web.errors import error_response
from appliance.web.services import Services, services

log = logging.getLogger(__name__)

# /asr and /detect-language: the whisper-asr-webservice API (appliance.web.api.asr_compat)
PROTECTED = ("/transcribe", "/v1/", "/api/", "/ws/live", "/asr", "/detect-language")
# WebSockets that take a rate-limit token when opened (live sessions)
LIVE_WEBSOCKETS = ("/ws/live", "/v1/realtime")
# WebSockets that run `websocket_refusal` themselves once accepted, to answer in their own
# protocol (OpenAI Realtime clients expect an `error` event, not an HTTP 401)
SELF_CHECKED_WEBSOCKETS = ("/v1/realtime",)
UNSAFE_METHODS = ("POST", "PUT", "PATCH", "DELETE")
CSP = "; ".join(
    (
        "default-src 'self'",
        "script-src 'self'",
        "style-src 'self' 'unsafe-inline'",
        "img-src 'self' data: blob:",
        "media-src 'self' blob:",
        "font-src 'self' data:",
        "connect-src 'self'",
        "worker-src 'self'",
        "object-src 'none'",
        "base-uri 'self'",
        "form-action 'self'",
        "frame-ancestors 'none'",
    )
)
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Permissions-Policy": "microphone=(self), camera=(), geolocation=(), payment=()",
}
HSTS = "max-age=31536000"
CORS_METHODS = "GET, POST, PATCH, DELETE, OPTIONS"
CORS_HEADERS = "Authorization, Content-Type, If-Match, X-Request-ID"
CORS_EXPOSE = "Retry-After, X-Request-ID, Location, ETag"


def get_auth() -> Auth:
    return services().auth


def client_ip(req: _Request | Websocket | None = None) -> str:
    """The client's address: the peer, or behind a TRUSTED_PROXIES proxy the address it saw."""
    req = req or request
    peer = req.remote_addr or "unknown"
    proxies = services().settings.trusted_proxies
    if not proxies:
        return peer
    return forwarded_client(peer, req.headers.getlist("X-Forwarded-For"), proxies)


def forwarded_client(peer: str, forwarded_for: list[str], proxies: Iterable[Network]) -> str:
    """Walk X-Forwarded-For from the right (the hops our proxies appended) to the first address
    that is not one of our proxies. Only a trusted peer's header counts, and an unparsable hop
    ends the walk: anything left of it was written by the client and can be forged."""
    proxies = tuple(proxies)

    def trusted(address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in net for net in proxies)

    if not trusted(peer):
        return peer
    client = peer
    hops = [hop.strip() for value in forwarded_for for hop in value.split(",")]
    for hop in reversed(hops):
        try:
            client = str(ipaddress.ip_address(hop))
        except ValueError:
            break
        if not trusted(client):
            break
    return client


def _is_protected(path: str) -> bool:
    return path.startswith(PROTECTED)


def _is_transcription(method: str, path: str) -> bool:
    """Requests that queue work: uploads to transcribe (job polling costs nothing)."""
    return method == "POST" and (
        path in ("/transcribe", "/api/jobs", "/asr", "/detect-language")
        or path.startswith("/v1/audio/")
    )


async def current_session(req: _Request | Websocket | None = None) -> Session | None:
    """The admin session of this request (cached per request), or None."""
    if "admin_session" not in g:
        cookie = (req or request).cookies.get(auth_mod.SESSION_COOKIE)
        g.admin_session = await get_auth().session(cookie) if cookie else None
    result: Session | None = g.admin_session
    return result


def _bearer(req: _Request | Websocket) -> str | None:
    value = req.headers.get("Authorization", "")
    scheme, _, token = value.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def same_origin(origin: str, host: str) -> bool:
    parts = urlsplit(origin)
    netloc = parts.netloc.lower()
    default = {"https": ":443", "http": ":80"}.get(parts.scheme, "")
    host = host.lower()
    return netloc == host or netloc + default == host or netloc == host.removesuffix(default)


def origin_allowed(origin: str, host: str) -> bool:
    """Same origin, or listed in the allowed origins."""
    allowed = services().runtime.allowed_origins
    return same_origin(origin, host) or origin.lower().rstrip("/") in allowed


def _unauthorized(message: str) -> Response:
    return error_response(
        401,
        "unauthorized",
        message,
        {"WWW-Authenticate": 'Bearer realm="whisper-appliance"'},
    )


async def _authenticate(req: _Request | Websocket, method: str) -> Response | None:
    """Resolve the API key / session; refuse when a key is required and none is valid."""
    token = _bearer(req)
    key_id = await get_auth().verify_key(token) if token else None
    g.api_key_id = key_id
    required = services().runtime.require_api_key
    if not required or key_id:
        return None
    session = await current_session(req)
    if session is None:
        what = "this API key is unknown or revoked" if token else "an API key is required"
        return _unauthorized(f"{what}: send Authorization: Bearer <key> (keys: /admin)")
    origin = req.headers.get("Origin")
    is_ws = isinstance(req, Websocket)
    if origin and (is_ws or method in UNSAFE_METHODS) and not origin_allowed(origin, req.host):
        return error_response(403, "origin_refused", "cross-origin use of the admin session")
    return None


def _rate_limited(req: _Request | Websocket) -> Response | None:
    limiter = services().limiters.api
    key_id = g.get("api_key_id")
    bucket = f"key:{key_id}" if key_id else f"ip:{client_ip(req)}"
    wait = limiter.hit(bucket)
    if wait is None:
        return None
    log.info("rate limit reached for %s", bucket)
    return error_response(
        429,
        "rate_limited",
        f"too many transcription requests (limit {limiter.rate}); retry in {wait} s",
        {"Retry-After": str(wait)},
    )


async def websocket_refusal() -> Response | None:
    """API keys (when required) and the rate limit of live sessions for this WebSocket: the
    error response that refuses it, or None."""
    if not _is_protected(websocket.path):
        return None
    refused = await _authenticate(websocket, "GET")
    if refused is None and websocket.path.startswith(LIVE_WEBSOCKETS):
        refused = _rate_limited(websocket)
    return refused


def _preflight() -> Response:
    origin = request.headers.get("Origin", "")
    if not origin_allowed(origin, request.host):
        return error_response(403, "origin_refused", "this origin is not allowed (CORS)")
    response = Response(status=204)
    response.headers["Access-Control-Allow-Origin"] = origin
    response.headers["Access-Control-Allow-Methods"] = CORS_METHODS
    response.headers["Access-Control-Allow-Headers"] = CORS_HEADERS
    response.headers["Access-Control-Max-Age"] = "600"
    response.headers["Vary"] = "Origin"
    return response


BODYLESS_METHODS = ("GET", "HEAD")


def _has_body(req: _Request) -> bool:
    """Whether the request announces a body (chunked, or a non-zero Content-Length)."""
    return "Transfer-Encoding" in req.headers or (req.content_length or 0) > 0


def init_app(app: Quart) -> None:
    """The request and WebSocket guards and the response headers (what they read, the auth,
    the limiters and the runtime settings, is on the typed `Services`)."""

    @app.before_request
    async def _check_request() -> Response | None:
        if request.method in BODYLESS_METHODS and _has_body(request):
            # no handler reads it, and the server would buffer it for as long as the handler
            # runs (an event stream: indefinitely)
            return error_response(
                400, "body_not_allowed", f"{request.method} requests take no body"
            )
        path = request.path
        if (
            request.method == "OPTIONS"
            and "Origin" in request.headers
            and "Access-Control-Request-Method" in request.headers
            and not path.startswith("/admin")
        ):
            return _preflight()
        if not _is_protected(path):
            return None
        refused = await _authenticate(request, request.method)
        if refused is None and _is_transcription(request.method, path):
            refused = _rate_limited(request)
        return refused

    @app.before_websocket
    async def _check_websocket() -> Response | None:
        if websocket.path in SELF_CHECKED_WEBSOCKETS:
            return None
        return await websocket_refusal()

    @app.after_request
    async def _headers(response: Response) -> Response:
        for name, value in HEADERS.items():
            response.headers.setdefault(name, value)
        if request.scheme == "https":
            response.headers["Strict-Transport-Security"] = HSTS
        origin = request.headers.get("Origin")
        if (
            origin
            and not request.path.startswith("/admin")
            and not same_origin(origin, request.host)
            and origin.lower().rstrip("/") in _allowed_origins()
        ):
            response.headers["Access-Control-Allow-Origin"] = origin
            response.headers["Access-Control-Expose-Headers"] = CORS_EXPOSE
            response.vary.add("Origin")
        return response


def _allowed_origins() -> tuple[str, ...]:
    s: Services | None = current_app.extensions.get("appliance")  # None: not started yet
    return s.runtime.allowed_origins if s is not None else ()
