"""Requests the appliance makes to URLs its clients name (webhooks, URL input), SSRF-guarded.

A client-supplied URL must not turn the appliance into a proxy into places only it can reach.
Every request here:

- takes http and https URLs only;
- resolves the host name once, checks the addresses (see `Policy.refusal`) and connects to the
  checked address itself, sending the name in `Host` and as the TLS server name (certificates are
  still verified against the name): a DNS answer that changes between the check and the connect
  (DNS rebinding) cannot slip past;
- follows redirects only where the caller allows them, each hop checked the same way;
- ignores proxy variables from the environment (a proxy would connect elsewhere);
- has timeouts, and reads bodies through a bound chosen by the caller.

Refused unless listed in OUTBOUND_ALLOWED_NETWORKS: loopback, link-local (169.254.169.254, the
cloud metadata address, among them), multicast, unspecified, reserved addresses and the
appliance's own interface addresses; private (RFC 1918, ULA) addresses too when
OUTBOUND_ALLOW_PRIVATE=false. Public addresses are allowed.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import socket
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import unquote

import httpx
import psutil

from appliance.system.config import Network, Settings

log = logging.getLogger(__name__)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

MAX_URL_LENGTH = 2048
MAX_REDIRECTS = 5
CONNECT_TIMEOUT = 10.0
DOWNLOAD_SECONDS = 1800.0  # a whole URL download, however slowly the server drips
USER_AGENT = "whisper-appliance"


class OutboundError(Exception):
    """A URL that cannot be used or fetched; `status` and `code` are what the API answers."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


@dataclass(frozen=True)
class Policy:
    """Which addresses outbound requests may connect to."""

    allow_private: bool = True
    allowed: tuple[Network, ...] = ()

    @classmethod
    def from_settings(cls, settings: Settings) -> Policy:
        return cls(
            allow_private=settings.outbound_allow_private,
            allowed=settings.outbound_allowed_networks,
        )

    def refusal(self, ip: IPAddress) -> str | None:
        """Why `ip` is refused, or None when it may be used."""
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        if any(ip in net for net in self.allowed):
            return None
        if ip.is_loopback:
            return "a loopback address"
        if ip.is_link_local:
            return "a link-local address"
        if ip.is_multicast:
            return "a multicast address"
        if ip.is_unspecified or ip in ipaddress.ip_network("0.0.0.0/8"):
            return "an unspecified address"
        if ip.is_reserved:
            return "a reserved address"
        if ip in own_addresses():
            return "an address of this appliance"
        if not ip.is_global and not self.allow_private:
            return "a private address (OUTBOUND_ALLOW_PRIVATE=false)"
        return None


def own_addresses() -> set[IPAddress]:
    """The addresses of this machine's interfaces (read each time: DHCP may change them)."""
    found: set[IPAddress] = set()
    with contextlib.suppress(Exception):
        for addrs in psutil.net_if_addrs().values():
            for addr in addrs:
                if addr.family in (socket.AF_INET, socket.AF_INET6):
                    with contextlib.suppress(ValueError):
                        found.add(ipaddress.ip_address(addr.address.split("%")[0]))
    return found


def check_url(url: str, what: str = "url") -> httpx.URL:
    """A well-formed http(s) URL with a host, or OutboundError 400 `invalid_url`."""
    if not isinstance(url, str) or not url.strip():
        raise OutboundError(400, "invalid_url", f"{what} is empty")
    url = url.strip()
    if len(url) > MAX_URL_LENGTH:
        raise OutboundError(400, "invalid_url", f"{what} is longer than {MAX_URL_LENGTH} chars")
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, ValueError, TypeError):
        raise OutboundError(400, "invalid_url", f"{what} is not a valid URL") from None
    if parsed.scheme not in ("http", "https"):
        raise OutboundError(
            400,
            "invalid_url",
            f"{what} must be an http:// or https:// URL, not {parsed.scheme or 'relative'!r}",
        )
    if not parsed.host:
        raise OutboundError(400, "invalid_url", f"{what} has no host")
    if parsed.port is not None and not 0 < parsed.port < 65536:
        raise OutboundError(400, "invalid_url", f"{what} has an invalid port")
    return parsed


async def resolve(url: httpx.URL, policy: Policy) -> IPAddress:
    """The first address of the URL's host that the policy allows (refused: 400 url_refused)."""
    host = url.host
    port = url.port or (443 if url.scheme == "https" else 80)
    addresses: list[IPAddress] = []
    with contextlib.suppress(ValueError):
        addresses = [ipaddress.ip_address(host)]
    if not addresses:
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(
                host, port, type=socket.SOCK_STREAM
            )
        except (OSError, UnicodeError) as exc:
            raise OutboundError(422, "url_unreachable", f"cannot resolve {host!r}: {exc}") from None
        for info in infos:
            with contextlib.suppress(ValueError):
                address = ipaddress.ip_address(str(info[4][0]).split("%")[0])
                if address not in addresses:
                    addresses.append(address)
        if not addresses:
            raise OutboundError(422, "url_unreachable", f"{host!r} has no address")
    reasons = []
    for address in addresses:
        reason = policy.refusal(address)
        if reason is None:
            return address
        reasons.append(f"{address} is {reason}")
    raise OutboundError(
        400,
        "url_refused",
        f"{host} is refused: {'; '.join(reasons)} (allow it with OUTBOUND_ALLOWED_NETWORKS)",
    )


@contextlib.asynccontextmanager
async def request(
    method: str,
    url: str,
    policy: Policy,
    *,
    content: bytes | None = None,
    headers: dict[str, str] | None = None,
    seconds: float = 30.0,
    max_redirects: int = 0,
    what: str = "url",
) -> AsyncIterator[httpx.Response]:
    """Send the request to the checked address; yield the response with its body unread.

    With `max_redirects` > 0, redirects of GET requests are followed, each target checked;
    with 0 a redirect is returned as it is.
    """
    target = check_url(url, what)
    async with httpx.AsyncClient(
        trust_env=False,
        follow_redirects=False,
        timeout=httpx.Timeout(seconds, connect=min(seconds, CONNECT_TIMEOUT)),
    ) as client:
        for hop in range(max_redirects + 1):
            address = await resolve(target, policy)
            send_headers = {"User-Agent": USER_AGENT, **(headers or {})}
            send_headers["Host"] = target.netloc.decode("ascii")
            extensions: dict[str, Any] = {}
            if target.scheme == "https":
                extensions["sni_hostname"] = target.host
            req = client.build_request(
                method,
                target.copy_with(host=str(address)),
                content=content,
                headers=send_headers,
                extensions=extensions,
            )
            try:
                response = await client.send(req, stream=True)
            except httpx.TimeoutException:
                raise OutboundError(
                    422, "url_unreachable", f"{target.host} did not answer in time"
                ) from None
            except httpx.HTTPError as exc:
                raise OutboundError(
                    422, "url_unreachable", f"cannot reach {target.host}: {exc or type(exc)}"
                ) from None
            except Exception as exc:  # anything else the connection raises: still not a 500
                log.warning("request to %s failed: %r", target.host, exc)
                raise OutboundError(
                    422, "url_unreachable", f"cannot reach {target.host}: {type(exc).__name__}"
                ) from None
            try:
                location = response.headers.get("Location")
                if response.is_redirect and location and hop < max_redirects:
                    try:
                        target = check_url(
                            str(target.join(location)), f"the redirect from {target.host}"
                        )
                    except (httpx.InvalidURL, ValueError):
                        raise OutboundError(
                            422, "url_http_error", "the server sent an invalid redirect"
                        ) from None
                    continue
                if response.is_redirect and max_redirects:
                    raise OutboundError(
                        422, "url_http_error", f"more than {max_redirects} redirects"
                    )
                yield response
                return
            finally:
                await response.aclose()
    raise AssertionError("unreachable")  # pragma: no cover


@dataclass
class Download:
    path: Path
    filename: str
    size: int


async def download(url: str, tmp_dir: Path, max_size: int, policy: Policy) -> Download:
    """GET `url` into a new temp file in `tmp_dir`, never more than `max_size` bytes.

    Refused with OutboundError: a bad URL (400 invalid_url), a refused address (400
    url_refused), no answer (422 url_unreachable), an HTTP error (422 url_http_error), more
    than `max_size` bytes announced or received (413 file_too_large), nothing received (400).
    """
    from appliance.web.upload import TEMP_PREFIX, safe_filename

    too_large = OutboundError(
        413,
        "file_too_large",
        f"the file at the URL is larger than the limit of {max_size / 1000**2:.0f} MB "
        "(MAX_UPLOAD_SIZE)",
    )
    fd, name = tempfile.mkstemp(prefix=TEMP_PREFIX, dir=tmp_dir)
    path = Path(name)
    size = 0
    try:
        with os.fdopen(fd, "wb") as out:
            async with asyncio.timeout(DOWNLOAD_SECONDS):
                final, size = await _fetch_into(out, url, policy, max_size, too_large)
        if size == 0:
            raise OutboundError(400, "empty_file", "the file at the URL is empty")
    except TimeoutError:
        await asyncio.to_thread(path.unlink, True)
        raise OutboundError(
            422, "url_unreachable", f"the download took longer than {DOWNLOAD_SECONDS:.0f} s"
        ) from None
    except BaseException:
        await asyncio.to_thread(path.unlink, True)
        raise
    filename = safe_filename(unquote(final.rsplit("/", 1)[-1]) or "audio")
    return Download(path, filename, size)


async def _fetch_into(
    out: BinaryIO, url: str, policy: Policy, max_size: int, too_large: OutboundError
) -> tuple[str, int]:
    """Stream the body of `url` into `out`; return the final URL's path and the size."""
    size = 0
    async with request(
        "GET",
        url,
        policy,
        headers={"Accept-Encoding": "identity"},
        seconds=60.0,
        max_redirects=MAX_REDIRECTS,
    ) as response:
        if response.status_code >= 300:
            raise OutboundError(
                422,
                "url_http_error",
                f"the server answered HTTP {response.status_code} for the URL",
            )
        declared = response.headers.get("Content-Length", "")
        if declared.isdigit() and int(declared) > max_size:
            raise too_large
        try:
            async for chunk in response.aiter_bytes():
                size += len(chunk)
                if size > max_size:
                    raise too_large
                out.write(chunk)
        except httpx.HTTPError as exc:
            raise OutboundError(
                422, "url_unreachable", f"the download broke off: {exc or type(exc)}"
            ) from None
        return response.request.url.path, size
