"""TLS: the generated CA and server certificate, re-issue, custom certificates, the HTTPS
listener (TLS 1.2+, ALPN http/1.1) and the plain-HTTP redirect listener."""

from __future__ import annotations

import contextlib
import datetime as dt
import ipaddress
import os
import socket
import ssl
import subprocess
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from appliance.system import certificates as tls
from appliance.web import tls as web_tls
from tests.conftest import Server, free_port, start_server, stop_server
from tests.conftest import make_settings as make_settings


def os_addresses() -> set[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    """What the OS reports, computed independently of appliance.system.certificates."""
    found: set[ipaddress.IPv4Address | ipaddress.IPv6Address] = set()
    for entries in psutil.net_if_addrs().values():
        for entry in entries:
            if entry.family in (socket.AF_INET, socket.AF_INET6):
                found.add(ipaddress.ip_address(entry.address.split("%")[0]))
    return found


def load_cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def handshake(cert: Path, key: Path, ca: Path, server_name: str) -> None:
    """A full TLS handshake in memory: Python's ssl verifies the chain and the name/IP."""
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(cert, key)
    client_ctx = ssl.create_default_context(cafile=str(ca))
    c_in, c_out, s_in, s_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    client = client_ctx.wrap_bio(c_in, c_out, server_hostname=server_name)
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    done = {"client": False, "server": False}
    for _ in range(20):
        for name, side in (("client", client), ("server", server)):
            if done[name]:
                continue
            try:
                side.do_handshake()
                done[name] = True
            except ssl.SSLWantReadError:
                pass
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        if all(done.values()):
            return
    raise AssertionError("handshake did not finish")


def test_certificate_covers_every_address_and_verifies(tmp_path: Path) -> None:
    cert_file, key_file = tls.ensure_server_certificate(tmp_path / "tls")
    ca_file = tmp_path / "tls" / "ca.crt"
    names, ips = tls.certificate_sans(load_cert(cert_file))
    assert os_addresses() <= ips
    assert ipaddress.ip_address("127.0.0.1") in ips
    assert {"localhost", socket.gethostname().lower()} <= names
    fqdn = socket.getfqdn().lower().rstrip(".")
    if "." in fqdn and not fqdn.replace(".", "").isdigit():
        assert fqdn in names
    # the keys are private, the CA certificate is public
    assert (tmp_path / "tls" / "ca.key").stat().st_mode & 0o777 == 0o600
    assert key_file.stat().st_mode & 0o777 == 0o600
    for address in sorted(map(str, ips)) + sorted(names):
        handshake(cert_file, key_file, ca_file, address)
    with pytest.raises(ssl.SSLCertVerificationError):
        handshake(cert_file, key_file, ca_file, "192.0.2.99")  # not ours


def test_reissue_when_addresses_change_and_keep_the_ca(tmp_path: Path) -> None:
    directory = tmp_path / "tls"
    first = {ipaddress.ip_address("192.0.2.10"), ipaddress.ip_address("127.0.0.1")}
    cert_file, _ = tls.ensure_server_certificate(directory, {"localhost"}, first)
    serial = load_cert(cert_file).serial_number
    ca_serial = load_cert(directory / "ca.crt").serial_number

    tls.ensure_server_certificate(directory, {"localhost"}, first)
    assert load_cert(cert_file).serial_number == serial  # unchanged: not re-issued

    moved = {ipaddress.ip_address("192.0.2.20"), ipaddress.ip_address("2001:db8::20")}
    tls.ensure_server_certificate(directory, {"localhost", "box.lan"}, moved)
    cert = load_cert(cert_file)
    assert cert.serial_number != serial
    assert tls.certificate_sans(cert) == ({"localhost", "box.lan"}, moved)
    assert load_cert(directory / "ca.crt").serial_number == ca_serial  # clients keep trusting


def test_reissue_before_expiry(tmp_path: Path) -> None:
    directory = tmp_path / "tls"
    names = {"localhost"}
    ips = {ipaddress.ip_address("127.0.0.1")}
    ca_cert, ca_key = tls.ensure_ca(directory)
    cert, key = tls.issue_server_certificate(ca_cert, ca_key, names, ips, days=10)
    (directory / "server.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (directory / "server.key").write_bytes(tls._key_pem(key))
    reason = tls.reissue_reason(
        directory / "server.crt", directory / "server.key", ca_cert, names, ips
    )
    assert reason is not None and "expires" in reason
    cert_file, _ = tls.ensure_server_certificate(directory, names, ips)
    remaining = load_cert(cert_file).not_valid_after_utc - dt.datetime.now(dt.UTC)
    assert remaining > dt.timedelta(days=300)


def _self_signed(tmp_path: Path, name: str, days: int = 30) -> tuple[Path, Path]:
    directory = tmp_path / name
    ca_cert, ca_key = tls.ensure_ca(directory)
    cert, key = tls.issue_server_certificate(
        ca_cert, ca_key, {"appliance.example"}, {ipaddress.ip_address("127.0.0.1")}, days=days
    )
    cert_file, key_file = directory / "custom.crt", directory / "custom.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(tls._key_pem(key))
    return cert_file, key_file


def test_custom_certificate_is_used(tmp_path: Path) -> None:
    cert_file, key_file = _self_signed(tmp_path, "custom")
    settings = make_settings(
        tmp_path / "data", https_enabled=True, ssl_cert_path=cert_file, ssl_key_path=key_file
    )
    assert tls.server_certificate(settings) == (cert_file, key_file)
    assert not (tmp_path / "data" / "tls").exists()  # no CA generated next to a custom cert


def test_custom_certificate_with_the_wrong_key_fails_clearly(tmp_path: Path) -> None:
    cert_file, _ = _self_signed(tmp_path, "one")
    other_key = tmp_path / "other.key"
    other_key.write_bytes(tls._key_pem(ec.generate_private_key(ec.SECP256R1())))
    settings = make_settings(
        tmp_path / "data", https_enabled=True, ssl_cert_path=cert_file, ssl_key_path=other_key
    )
    with pytest.raises(tls.TLSError, match="does not match the certificate"):
        tls.server_certificate(settings)


def test_custom_certificate_errors(tmp_path: Path) -> None:
    cert_file, key_file = _self_signed(tmp_path, "one")
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate")
    with pytest.raises(tls.TLSError, match="holds no PEM certificate"):
        tls.check_custom_certificate(garbage, key_file)
    with pytest.raises(tls.TLSError, match="not an unencrypted PEM private key"):
        tls.check_custom_certificate(cert_file, garbage)
    with pytest.raises(tls.TLSError, match="cannot read"):
        tls.check_custom_certificate(tmp_path / "missing.pem", key_file)
    ca_cert, ca_key = tls.ensure_ca(tmp_path / "one")
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    expired = (
        x509.CertificateBuilder()
        .subject_name(ca_cert.subject)
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now - dt.timedelta(days=60))
        .not_valid_after(now - dt.timedelta(days=1))
        .sign(ca_key, tls.hashes.SHA256())
    )
    expired_file, expired_key = tmp_path / "expired.crt", tmp_path / "expired.key"
    expired_file.write_bytes(expired.public_bytes(serialization.Encoding.PEM))
    expired_key.write_bytes(tls._key_pem(key))
    with pytest.raises(tls.TLSError, match="expired on"):
        tls.check_custom_certificate(expired_file, expired_key)


def test_serve_refuses_a_mismatched_key_with_a_clear_message(tmp_path: Path) -> None:
    cert_file, _ = _self_signed(tmp_path, "one")
    _, other_key = _self_signed(tmp_path, "two")
    env = {
        **os.environ,
        "DATA_DIR": str(tmp_path / "data"),
        "HTTPS_ENABLED": "true",
        "HTTPS_PORT": str(free_port()),
        "BIND_ADDRESS": "127.0.0.1",
        "SSL_CERT_PATH": str(cert_file),
        "SSL_KEY_PATH": str(other_key),
    }
    result = subprocess.run(
        [sys.executable, "-m", "appliance", "serve"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert "does not match the certificate" in result.stderr


def test_redirect_location() -> None:
    assert (
        web_tls.redirect_location("192.168.1.50", "/admin", "a=1", 5001)
        == "https://192.168.1.50:5001/admin?a=1"
    )
    assert web_tls.redirect_location("box.lan:80", "/", "", 443) == "https://box.lan/"
    assert web_tls.redirect_location("[fe80::1]:80", "/x", "", 5001) == "https://[fe80::1]:5001/x"
    assert web_tls.redirect_location("evil\r\nX: y", "/", "", 5001) is None
    assert web_tls.redirect_location("", "/", "", 5001) is None


# --- a real HTTPS server with the redirect listener ------------------------------------------
@pytest.fixture(scope="module")
def https_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, int]]:
    http_port = free_port()
    srv = start_server(
        tmp_path_factory.mktemp("https") / "data",
        {"HTTPS_ENABLED": "true", "HTTP_REDIRECT": "true", "HTTP_PORT": str(http_port)},
    )
    yield srv, http_port
    stop_server(srv)


def _ca_context(server: Server) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(server.data_dir / "tls" / "ca.crt"))


def test_https_listener_is_verified_and_speaks_http11_over_tls12_plus(
    https_server: tuple[Server, int],
) -> None:
    server, _ = https_server
    context = _ca_context(server)
    response = httpx.get(f"{server.url}/health", verify=context)
    assert response.status_code == 200
    assert response.headers["Strict-Transport-Security"].startswith("max-age=")
    port = int(server.url.rsplit(":", 1)[1])
    context.set_alpn_protocols(["h2", "http/1.1"])
    with (
        socket.create_connection(("127.0.0.1", port)) as raw,
        context.wrap_socket(raw, server_hostname="127.0.0.1") as conn,
    ):
        assert conn.selected_alpn_protocol() == "http/1.1"
        assert conn.version() in ("TLSv1.2", "TLSv1.3")
    tls12 = _ca_context(server)
    tls12.maximum_version = ssl.TLSVersion.TLSv1_2
    with (
        socket.create_connection(("127.0.0.1", port)) as raw,
        tls12.wrap_socket(raw, server_hostname="127.0.0.1") as conn,
    ):
        assert conn.version() == "TLSv1.2"
    old = _ca_context(server)
    old.set_ciphers("DEFAULT:@SECLEVEL=0")  # let this client offer TLS 1.1 at all
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        old.minimum_version = ssl.TLSVersion.TLSv1
        old.maximum_version = ssl.TLSVersion.TLSv1_1
    with (
        pytest.raises(ssl.SSLError),
        socket.create_connection(("127.0.0.1", port)) as raw,
        old.wrap_socket(raw, server_hostname="127.0.0.1"),
    ):
        pass


def test_http_listener_redirects_with_308(https_server: tuple[Server, int]) -> None:
    server, http_port = https_server
    https_port = int(server.url.rsplit(":", 1)[1])
    response = httpx.get(f"http://127.0.0.1:{http_port}/admin/models?x=1")
    assert response.status_code == 308
    assert response.headers["Location"] == f"https://127.0.0.1:{https_port}/admin/models?x=1"
    post = httpx.post(f"http://localhost:{http_port}/transcribe", content=b"x")
    assert post.status_code == 308
    assert post.headers["Location"] == f"https://localhost:{https_port}/transcribe"
    # the exceptions: health checks and the CA download work over plain HTTP
    assert httpx.get(f"http://127.0.0.1:{http_port}/health").status_code == 200
    ca = httpx.get(f"http://127.0.0.1:{http_port}/ca.crt")
    assert ca.status_code == 200
    assert ca.content == (server.data_dir / "tls" / "ca.crt").read_bytes()
    # and following the redirect lands on a verified HTTPS page
    followed = httpx.get(
        f"http://127.0.0.1:{http_port}/health", follow_redirects=True, verify=_ca_context(server)
    )
    assert followed.status_code == 200


def test_ca_download_and_trust_page(https_server: tuple[Server, int]) -> None:
    server, _ = https_server
    context = _ca_context(server)
    ca = httpx.get(f"{server.url}/ca.crt", verify=context)
    assert ca.status_code == 200
    assert ca.headers["Content-Type"].startswith("application/x-x509-ca-cert")
    assert "attachment" in ca.headers["Content-Disposition"]
    cert = x509.load_pem_x509_certificate(ca.content)
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    page = httpx.get(f"{server.url}/trust", verify=context)
    assert page.status_code == 200
    for system in ("Windows", "macOS", "Linux", "Android", "iOS"):
        assert system in page.text
    assert tls.ca_fingerprint(make_settings(server.data_dir)) in page.text
    assert "<script>" not in page.text


def test_running_listener_gets_the_reissued_certificate(tmp_path: Path) -> None:
    """A new DHCP address while running: the same SSLContext serves a certificate for it."""
    from hypercorn.config import Config

    settings = make_settings(tmp_path / "data", https_enabled=True)
    first = {ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("192.0.2.10")}
    cert_file, key_file = tls.ensure_server_certificate(tls.tls_dir(settings), {"localhost"}, first)
    config = Config()
    config.certfile, config.keyfile = str(cert_file), str(key_file)
    live = web_tls.LiveCertificate(settings)
    live.attach(config)
    context = config.create_ssl_context()  # what Hypercorn does once at start
    assert context is not None and live.contexts == [context]
    assert not live.refresh({"localhost"}, first)  # nothing changed
    moved = {ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("192.0.2.77")}
    assert live.refresh({"localhost"}, moved)
    ca = tls.ca_cert_path(settings)
    client = ssl.create_default_context(cafile=str(ca))
    c_in, c_out, s_in, s_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    tls_client = client.wrap_bio(c_in, c_out, server_hostname="192.0.2.77")
    tls_server = context.wrap_bio(s_in, s_out, server_side=True)
    for _ in range(10):
        for side in (tls_client, tls_server):
            with contextlib.suppress(ssl.SSLWantReadError):
                side.do_handshake()
        s_in.write(c_out.read())
        c_in.write(s_out.read())
    assert tls_client.getpeercert() is not None


# --- a custom certificate with its issuer named: a cluster node (issue 16) --------------------
def test_issuing_ca_is_checked(tmp_path: Path) -> None:
    cert_file, key_file = _self_signed(tmp_path, "cluster")
    ca_file = tmp_path / "cluster" / "ca.crt"
    tls.ensure_ca(tmp_path / "other")
    other_ca = tmp_path / "other" / "ca.crt"
    settings = make_settings(
        tmp_path / "data",
        https_enabled=True,
        ssl_cert_path=cert_file,
        ssl_key_path=key_file,
        ssl_ca_path=ca_file,
    )
    assert tls.server_certificate(settings) == (cert_file, key_file)
    assert tls.ca_cert_path(settings) == ca_file
    wrong = settings.model_copy(update={"ssl_ca_path": other_ca})
    with pytest.raises(tls.TLSError, match="did not issue SSL_CERT_PATH"):
        tls.server_certificate(wrong)
    not_ca = settings.model_copy(update={"ssl_ca_path": cert_file})
    with pytest.raises(tls.TLSError, match="not a CA certificate"):
        tls.server_certificate(not_ca)
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate")
    with pytest.raises(tls.TLSError, match="holds no PEM certificate"):
        tls.server_certificate(settings.model_copy(update={"ssl_ca_path": garbage}))


def test_a_node_offers_the_cluster_ca(tmp_path: Path) -> None:
    """Behind a load balancer every node serves a certificate from one cluster CA, and
    /ca.crt and /trust offer that CA, whichever node answers."""
    cert_file, key_file = _self_signed(tmp_path, "cluster")
    ca_file = tmp_path / "cluster" / "ca.crt"
    server = start_server(
        tmp_path / "data",
        {
            "HTTPS_ENABLED": "true",
            "SSL_CERT_PATH": str(cert_file),
            "SSL_KEY_PATH": str(key_file),
            "SSL_CA_PATH": str(ca_file),
        },
    )
    try:
        context = ssl.create_default_context(cafile=str(ca_file))
        served = httpx.get(f"{server.url}/ca.crt", verify=context)
        assert served.status_code == 200
        assert served.content == ca_file.read_bytes()
        page = httpx.get(f"{server.url}/trust", verify=context)
        assert page.status_code == 200
        fingerprint = load_cert(ca_file).fingerprint(hashes.SHA256()).hex().upper()
        assert ":".join(fingerprint[i : i + 2] for i in range(0, 64, 2)) in page.text
        assert str(ca_file) in page.text
        assert not (tmp_path / "data" / "tls").exists()
    finally:
        stop_server(server)
