"""The appliance's certificates: a local CA, a server certificate for every local address, the
custom certificate check. (Serving them: appliance.web.tls.)

Browsers only grant the microphone to secure contexts, so `https://192.168.1.50:5001` must
present a certificate that is valid for that exact address. At the first start a CA is created
in `DATA_DIR/tls` (key 0600) and kept: clients trust it once. The server certificate it signs is
re-issued at every start where the host's names or addresses changed, the CA changed, or expiry
is less than 30 days away. `SSL_CERT_PATH`/`SSL_KEY_PATH` replace all of this with a custom
certificate, validated at start.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import logging
import os
import re
import socket
from collections.abc import Iterable
from pathlib import Path

import psutil
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import (
    CertificateIssuerPrivateKeyTypes,
    PrivateKeyTypes,
)
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from appliance.system.config import ConfigError, Settings

log = logging.getLogger(__name__)

CA_DAYS = 3650
SERVER_DAYS = 397  # Apple and browsers refuse longer-lived server certificates
RENEW_BEFORE_DAYS = 30
CA_FILE = "ca.crt"
CA_KEY_FILE = "ca.key"
SERVER_FILE = "server.crt"
SERVER_KEY_FILE = "server.key"

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class TLSError(ConfigError):
    """The certificate the appliance should serve is unusable; the message says why."""


# --- what the certificate must cover ---------------------------------------------------------
def host_names() -> set[str]:
    """The host name, its FQDN and `localhost` (lower case, valid DNS names only)."""
    names = {"localhost"}
    for name in (socket.gethostname(), socket.getfqdn()):
        name = name.strip().rstrip(".").lower()
        if name and _DNS_NAME.fullmatch(name) and not _looks_like_ip(name):
            names.add(name)
    return names


def host_addresses() -> set[IPAddress]:
    """Every IPv4/IPv6 address of every interface, loopback included (scope ids dropped)."""
    addresses: set[IPAddress] = set()
    for entries in psutil.net_if_addrs().values():
        for entry in entries:
            if entry.family not in (socket.AF_INET, socket.AF_INET6):
                continue
            try:
                addresses.add(ipaddress.ip_address(entry.address.split("%", 1)[0]))
            except ValueError:
                continue
    addresses.update({ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")})
    return addresses


_LABEL = r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?"
_DNS_NAME = re.compile(rf"(?=.{{1,253}}$){_LABEL}(\.{_LABEL})*")


def _looks_like_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def certificate_sans(cert: x509.Certificate) -> tuple[set[str], set[IPAddress]]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return set(), set()
    names = {n.lower() for n in san.get_values_for_type(x509.DNSName)}
    ips: set[IPAddress] = set()
    for ip in san.get_values_for_type(x509.IPAddress):
        if isinstance(ip, ipaddress.IPv4Address | ipaddress.IPv6Address):
            ips.add(ip)
    return names, ips


# --- files ---------------------------------------------------------------------------------
def tls_dir(settings: Settings) -> Path:
    return settings.data_dir / "tls"


def ca_cert_path(settings: Settings) -> Path:
    """The CA certificate /ca.crt offers: the one that issued a custom certificate
    (`SSL_CA_PATH`, e.g. a cluster's CA, so every node and the load balancer offer the same),
    else the generated one."""
    if settings.ssl_ca_path is not None:
        return settings.ssl_ca_path
    return tls_dir(settings) / CA_FILE


def _write_private(path: Path, data: bytes) -> None:
    """Write a file readable by the owner only, replacing any previous one atomically."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(data)
    tmp.replace(path)


def _write_public(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    tmp.chmod(0o644)
    tmp.replace(path)


def _key_usage(*, ca: bool) -> x509.KeyUsage:
    """Signatures only; a CA also signs certificates and revocation lists."""
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


def _key_pem(key: PrivateKeyTypes) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


# --- the local CA and the server certificate ----------------------------------------------------
def ensure_ca(directory: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """Load the CA of this appliance, creating it at the first start (kept forever after)."""
    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(0o700)
    cert_file, key_file = directory / CA_FILE, directory / CA_KEY_FILE
    if cert_file.is_file() and key_file.is_file():
        cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
        key = serialization.load_pem_private_key(key_file.read_bytes(), password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise TLSError(f"{key_file}: the CA key is not an EC key; remove {directory}")
        key_file.chmod(0o600)
        cert_file.chmod(0o644)  # the CA certificate is public (served at /ca.crt)
        if cert.not_valid_after_utc > _now() + dt.timedelta(days=SERVER_DAYS):
            return cert, key
        log.warning("the local CA expires on %s: creating a new one", cert.not_valid_after_utc)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Whisper appliance"),
            x509.NameAttribute(
                NameOID.COMMON_NAME, f"Whisper appliance CA {socket.gethostname()[:40]}"
            ),
        ]
    )
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(ca=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    _write_private(key_file, _key_pem(key))
    _write_public(cert_file, cert.public_bytes(serialization.Encoding.PEM))
    log.info("created the local certificate authority %s", cert_file)
    return cert, key


def issue_server_certificate(
    ca_cert: x509.Certificate,
    ca_key: CertificateIssuerPrivateKeyTypes,
    names: Iterable[str],
    addresses: Iterable[IPAddress],
    days: int = SERVER_DAYS,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    names = sorted(set(names))
    addresses = sorted(set(addresses), key=lambda a: (a.version, int(a)))
    key = ec.generate_private_key(ec.SECP256R1())
    common = names[0] if names else str(addresses[0])
    for preferred in names:
        if preferred != "localhost":
            common = preferred
            break
    sans: list[x509.GeneralName] = [x509.DNSName(n) for n in names]
    sans += [x509.IPAddress(a) for a in addresses]
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common[:64])]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(min(now + dt.timedelta(days=days), ca_cert.not_valid_after_utc))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(ca=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    return cert, key


def reissue_reason(
    cert_file: Path,
    key_file: Path,
    ca_cert: x509.Certificate,
    names: set[str],
    addresses: set[IPAddress],
) -> str | None:
    """Why the server certificate must be (re-)issued, or None when it is still good."""
    if not cert_file.is_file() or not key_file.is_file():
        return "no server certificate yet"
    try:
        cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
        key = serialization.load_pem_private_key(key_file.read_bytes(), password=None)
    except (ValueError, TypeError):
        return "the server certificate or key is unreadable"
    if cert.public_key() != key.public_key():
        return "the server key does not match the certificate"
    try:
        cert.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError, InvalidSignature):
        return "the server certificate was not issued by the current CA"
    if cert.not_valid_after_utc - _now() < dt.timedelta(days=RENEW_BEFORE_DAYS):
        return f"the server certificate expires on {cert.not_valid_after_utc:%Y-%m-%d}"
    have_names, have_ips = certificate_sans(cert)
    if have_names != names or have_ips != addresses:
        added = sorted(map(str, (names - have_names) | (addresses - have_ips)))
        removed = sorted(map(str, (have_names - names) | (have_ips - addresses)))
        return f"the host's names/addresses changed (new: {added}, gone: {removed})"
    return None


def ensure_server_certificate(
    directory: Path,
    names: set[str] | None = None,
    addresses: set[IPAddress] | None = None,
) -> tuple[Path, Path]:
    """CA + a server certificate for the given (default: this host's) names and addresses."""
    names = host_names() if names is None else names
    addresses = host_addresses() if addresses is None else addresses
    ca_cert, ca_key = ensure_ca(directory)
    cert_file, key_file = directory / SERVER_FILE, directory / SERVER_KEY_FILE
    reason = reissue_reason(cert_file, key_file, ca_cert, names, addresses)
    if reason:
        cert, key = issue_server_certificate(ca_cert, ca_key, names, addresses)
        _write_private(key_file, _key_pem(key))
        _write_public(cert_file, cert.public_bytes(serialization.Encoding.PEM))
        log.info(
            "issued the server certificate (%s) for %s",
            reason,
            ", ".join(sorted(names) + sorted(map(str, addresses))),
        )
    return cert_file, key_file


# --- a custom certificate ---------------------------------------------------------------------
def check_custom_certificate(cert_file: Path, key_file: Path) -> None:
    """Refuse a custom pair that is unreadable, mismatched, expired or not yet valid."""
    try:
        certs = x509.load_pem_x509_certificates(cert_file.read_bytes())
    except OSError as exc:
        raise TLSError(f"SSL_CERT_PATH: cannot read {cert_file}: {exc.strerror}") from None
    except ValueError:
        raise TLSError(f"SSL_CERT_PATH: {cert_file} holds no PEM certificate") from None
    try:
        key = serialization.load_pem_private_key(key_file.read_bytes(), password=None)
    except OSError as exc:
        raise TLSError(f"SSL_KEY_PATH: cannot read {key_file}: {exc.strerror}") from None
    except (ValueError, TypeError):
        raise TLSError(f"SSL_KEY_PATH: {key_file} is not an unencrypted PEM private key") from None
    cert = certs[0]  # the leaf; any further certificates are the chain
    if not isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey):
        raise TLSError(f"SSL_KEY_PATH: {key_file} is neither an RSA nor an EC key")
    if cert.public_key() != key.public_key():
        raise TLSError(
            f"SSL_KEY_PATH: the key in {key_file} does not match the certificate in "
            f"{cert_file} (the certificate was issued for a different key)"
        )
    now = _now()
    if cert.not_valid_after_utc <= now:
        raise TLSError(
            f"SSL_CERT_PATH: the certificate in {cert_file} expired on "
            f"{cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC"
        )
    if cert.not_valid_before_utc > now:
        raise TLSError(
            f"SSL_CERT_PATH: the certificate in {cert_file} is not valid before "
            f"{cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC (check the clock)"
        )


def server_certificate(settings: Settings) -> tuple[Path, Path]:
    """(certificate, key) files Hypercorn should serve: the custom pair or the generated one."""
    if settings.ssl_cert_path is not None and settings.ssl_key_path is not None:
        check_custom_certificate(settings.ssl_cert_path, settings.ssl_key_path)
        if settings.ssl_ca_path is not None:
            check_issuing_ca(settings.ssl_ca_path, settings.ssl_cert_path)
        return settings.ssl_cert_path, settings.ssl_key_path
    return ensure_server_certificate(tls_dir(settings))


def check_issuing_ca(ca_file: Path, cert_file: Path) -> None:
    """Refuse an `SSL_CA_PATH` that is not a CA certificate or did not sign the custom one:
    browsers told to trust it would still refuse the appliance."""
    try:
        ca = x509.load_pem_x509_certificate(ca_file.read_bytes())
    except (OSError, ValueError) as exc:
        raise TLSError(f"SSL_CA_PATH {ca_file}: holds no PEM certificate ({exc})") from None
    try:
        is_ca = ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    if not is_ca:
        raise TLSError(f"SSL_CA_PATH {ca_file}: not a CA certificate")
    cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        raise TLSError(f"SSL_CA_PATH {ca_file} did not issue SSL_CERT_PATH {cert_file}") from None


def ca_fingerprint(settings: Settings) -> str | None:
    path = ca_cert_path(settings)
    if not path.is_file():
        return None
    cert = x509.load_pem_x509_certificate(path.read_bytes())
    digest = cert.fingerprint(hashes.SHA256()).hex().upper()
    return ":".join(digest[i : i + 2] for i in range(0, len(digest), 2))
