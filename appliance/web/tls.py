"""HTTPS while serving: the generated certificate swapped into the running listener when the
addresses change, the plain-HTTP redirect listener, and the `/ca.crt` + `/trust` pages.
(Making the certificates: appliance.system.certificates.)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import ssl
from collections.abc import Awaitable, Callable
from typing import Any

from hypercorn.config import Config
from quart import Blueprint, Quart, Response, render_template

from appliance.system.certificates import (
    SERVER_FILE,
    SERVER_KEY_FILE,
    IPAddress,
    ca_cert_path,
    ca_fingerprint,
    ensure_ca,
    ensure_server_certificate,
    host_addresses,
    host_names,
    reissue_reason,
    tls_dir,
)
from appliance.system.config import Settings
from appliance.web.errors import APIError

log = logging.getLogger(__name__)


# --- keeping the served certificate current while running -------------------------------------
class LiveCertificate:
    """Swaps a re-issued certificate into the running listener: when DHCP hands the appliance
    a new address, or expiry comes near, without a restart.

    Hypercorn builds its SSLContext once; `attach` keeps a reference to it, and `refresh`
    loads the new pair into that same context (new connections get it, open ones keep theirs).
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.contexts: list[ssl.SSLContext] = []

    def attach(self, config: Config) -> None:
        create = config.create_ssl_context

        def create_and_keep() -> ssl.SSLContext | None:
            context = create()
            if context is not None:
                self.contexts.append(context)
            return context

        config.create_ssl_context = create_and_keep  # type: ignore[method-assign]

    def refresh(
        self, names: set[str] | None = None, addresses: set[IPAddress] | None = None
    ) -> bool:
        """Re-issue if the names/addresses changed or expiry is near; True when it did."""
        directory = tls_dir(self.settings)
        names = host_names() if names is None else names
        addresses = host_addresses() if addresses is None else addresses
        ca_cert, _ = ensure_ca(directory)
        cert_file, key_file = directory / SERVER_FILE, directory / SERVER_KEY_FILE
        if reissue_reason(cert_file, key_file, ca_cert, names, addresses) is None:
            return False
        ensure_server_certificate(directory, names, addresses)
        for context in self.contexts:
            context.load_cert_chain(cert_file, key_file)
        return True

    async def watch(self, stop: asyncio.Event, interval: float = 60.0) -> None:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), interval)
            if stop.is_set():
                return
            try:
                await asyncio.to_thread(self.refresh)
            except Exception:  # keep serving the current certificate
                log.exception("could not refresh the server certificate")


def watch_certificate(settings: Settings, config: Config, stop: asyncio.Event) -> Awaitable[None]:
    """Call before the server starts (it hooks the SSL context); await the result alongside."""
    live = LiveCertificate(settings)
    live.attach(config)
    return live.watch(stop)


# --- the plain-HTTP redirect listener ------------------------------------------------------------
_HOST = re.compile(r"^(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9.-]{1,253})(:\d{1,5})?$")
PASS_THROUGH = ("/health", "/ca.crt")

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


def redirect_location(host_header: str, path: str, query: str, https_port: int) -> str | None:
    """The HTTPS URL for a plain-HTTP request, or None when the Host header is not sane."""
    match = _HOST.match(host_header.strip())
    if not match:
        return None
    host = match.group(1)
    port = "" if https_port == 443 else f":{https_port}"
    location = f"https://{host}{port}{path}"
    return f"{location}?{query}" if query else location


def redirect_app(settings: Settings, app: ASGIApp | None = None) -> ASGIApp:
    """ASGI app answering 308 to the HTTPS URL; /health and /ca.crt are served as they are."""

    async def asgi(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":  # the main listener runs the app's lifespan
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        path = scope.get("path", "/")
        if path in PASS_THROUGH:
            if app is not None:
                await app(scope, receive, send)
                return
            if path == "/ca.crt" and ca_cert_path(settings).is_file():
                await _plain(send, 200, ca_cert_path(settings).read_bytes(), CA_MEDIA_TYPE)
            else:
                await _plain(send, 200 if path == "/health" else 404, b"")
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        query = scope.get("query_string", b"").decode("latin-1")
        location = redirect_location(headers.get("host", ""), path, query, settings.https_port)
        if location is None:
            await _plain(send, 400, b"bad Host header\n")
            return
        await _plain(send, 308, f"use {location}\n".encode(), extra=[(b"location", location)])

    return asgi


async def _plain(
    send: Send,
    status: int,
    body: bytes,
    media_type: str = "text/plain; charset=utf-8",
    extra: list[tuple[bytes, str]] | None = None,
) -> None:
    headers = [
        (b"content-type", media_type.encode()),
        (b"content-length", str(len(body)).encode()),
        (b"x-content-type-options", b"nosniff"),
    ]
    headers += [(name, value.encode("latin-1")) for name, value in extra or []]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def serve_redirect(
    settings: Settings, stop: asyncio.Event, app: ASGIApp | None, config: Config
) -> None:
    """Listen on HTTP_PORT (`config`) and redirect all but /health and /ca.crt to HTTPS."""
    from hypercorn.asyncio import serve as hypercorn_serve

    log.info("redirecting http://%s:%d to HTTPS", settings.bind_address, settings.http_port)
    await hypercorn_serve(redirect_app(settings, app), config, shutdown_trigger=stop.wait)  # type: ignore[arg-type]


# --- routes: the CA download and the "trust this appliance" page ---------------------------------
CA_MEDIA_TYPE = "application/x-x509-ca-cert"
blueprint = Blueprint("tls", __name__)


def _settings() -> Settings:
    from quart import current_app

    result: Settings = current_app.extensions["settings"]
    return result


@blueprint.get("/ca.crt")
async def ca_certificate() -> Response:
    """The appliance's CA certificate (PEM): install it once to trust the appliance."""
    path = ca_cert_path(_settings())
    if not path.is_file():
        raise APIError(
            404,
            "no_local_ca",
            "this appliance serves a custom certificate or plain HTTP: it has no local CA",
        )
    response = Response(path.read_bytes(), mimetype=CA_MEDIA_TYPE)
    response.headers["Content-Disposition"] = 'attachment; filename="whisper-appliance-ca.crt"'
    response.headers["Cache-Control"] = "no-cache"
    return response


@blueprint.get("/trust")
async def trust() -> str:
    """How to trust the appliance's certificate on Windows, macOS, Linux, Android and iOS."""
    from appliance.web.admin.pages import context

    settings = _settings()
    return await render_template(
        "admin/trust.html",
        **context(
            "trust",
            "Trust this appliance's certificate",
            fingerprint=ca_fingerprint(settings),
            # a custom certificate with its issuer named (SSL_CA_PATH) offers that issuer
            custom=settings.ssl_cert_path is not None and settings.ssl_ca_path is None,
            ca_path=str(ca_cert_path(settings)),
            https=settings.https_enabled,
        ),
    )


def init_app(app: Quart) -> None:
    app.register_blueprint(blueprint)
