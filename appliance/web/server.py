"""Serve the app with Hypercorn: HTTP/1.1 only (WebSockets over HTTP/2 were unreliable in
Chromium), TLS when HTTPS_ENABLED, and the optional plain-HTTP redirect listener."""

from __future__ import annotations

import asyncio
import logging
import signal

from hypercorn.asyncio import serve as hypercorn_serve
from hypercorn.config import Config

from appliance.system.config import Settings
from appliance.web.app import create_app

log = logging.getLogger(__name__)

# Largest WebSocket message Hypercorn buffers before it closes 1009 on its own. It is above
# the app's own limits (LIVE_MAX_FRAME_BYTES is at most 1 MiB, control messages 4 KiB) so that
# an over-limit frame reaches /ws/live, which answers `frame_too_large` before closing; it
# still bounds what one connection can make the server hold.
WEBSOCKET_MAX_MESSAGE = 4 * 1024 * 1024


def listener_config(settings: Settings, port: int) -> Config:
    """What every listener shares: the bind address, HTTP/1.1 only, our own logging."""
    config = Config()
    host = settings.bind_address
    host = f"[{host}]" if ":" in host else host
    config.bind = [f"{host}:{port}"]
    config.alpn_protocols = ["http/1.1"]
    config.accesslog = None
    config.errorlog = logging.getLogger("hypercorn.error")
    config.graceful_timeout = 10
    config.websocket_max_message_size = WEBSOCKET_MAX_MESSAGE
    return config


def hypercorn_config(settings: Settings) -> Config:
    config = listener_config(settings, settings.https_port)
    if settings.https_enabled:
        configure_tls(config, settings)
    return config


def configure_tls(config: Config, settings: Settings) -> None:
    """Certificates from appliance.system.certificates (generated CA + server cert, or the
    custom pair)."""
    from appliance.system.certificates import server_certificate

    cert, key = server_certificate(settings)
    config.certfile = str(cert)
    config.keyfile = str(key)


async def serve(settings: Settings) -> None:
    app = create_app(settings)
    config = hypercorn_config(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    scheme = "https" if settings.https_enabled else "http"
    log.info("serving on %s://%s:%d", scheme, settings.bind_address, settings.https_port)
    servers = [hypercorn_serve(app, config, shutdown_trigger=stop.wait)]
    if settings.https_enabled and settings.ssl_cert_path is None:
        from appliance.web import tls

        # re-issue and swap the generated certificate when the addresses change (DHCP)
        servers.append(tls.watch_certificate(settings, config, stop))  # type: ignore[arg-type]
    if settings.http_redirect:
        from appliance.web import tls

        # /health and /ca.crt on the HTTP port are answered by the same app (same services)
        redirect_config = listener_config(settings, settings.http_port)
        servers.append(tls.serve_redirect(settings, stop, app, redirect_config))  # type: ignore[arg-type]
    await asyncio.gather(*servers)
