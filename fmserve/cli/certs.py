"""`fmserve certs`: a certificate authority and one certificate per service, for a cluster that
runs TLS at the gateway and mTLS between services.

Every certificate names localhost, 127.0.0.1, ::1, the service names compose gives the
containers and any `--hosts`, and serves both as a server's and as a client's. The CA's
private key is used once and never written: issuing another certificate means running this
again. Private keys are written 0600 (created so, never readable by others in between)."""

from __future__ import annotations

import datetime
import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

# The five services, and `client`: the identity of the CLI, `fmserve up` and tests when they
# call a stage directly.
NAMES = ("gateway", "preprocess", "inference", "postprocess", "cache", "client")
LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1")
SERVICE_HOSTS = ("gateway", "preprocess", "inference", "postprocess", "cache")


class CertsError(RuntimeError):
    """The certificates cannot be written; the message says why and what to do."""


@dataclass(frozen=True)
class Issued:
    """What one run wrote: the folder, and every file in it."""

    folder: Path
    files: list[Path]


def generate(
    folder: Path, hosts: Sequence[str] = (), days: int = 825, force: bool = False
) -> Issued:
    """Write `ca.crt` and `NAME.crt` / `NAME.key` for every name in NAMES into `folder`."""
    if (folder / "ca.crt").exists() and not force:
        raise CertsError(f"{folder} already holds certificates; pass --force to replace them")
    folder.mkdir(parents=True, exist_ok=True)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _ca_certificate(ca_key, days)
    files = [_write(folder / "ca.crt", _pem(ca), 0o644)]
    names = _subject_alt_names([*LOCAL_HOSTS, *SERVICE_HOSTS, *hosts])
    for name in NAMES:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _leaf_certificate(name, key, ca, ca_key, names, days)
        files.append(_write(folder / f"{name}.crt", _pem(cert), 0o644))
        files.append(_write(folder / f"{name}.key", _private_pem(key), 0o600))
    return Issued(folder, files)


def _ca_certificate(key: ec.EllipticCurvePrivateKey, days: int) -> x509.Certificate:
    subject = _name("fmserve cluster CA")
    return (
        _builder(subject, subject, key.public_key(), days)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .sign(key, hashes.SHA256())
    )


def _leaf_certificate(
    name: str,
    key: ec.EllipticCurvePrivateKey,
    ca: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    names: x509.SubjectAlternativeName,
    days: int,
) -> x509.Certificate:
    usages = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
    authority = x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key())
    return (
        _builder(_name(f"fmserve {name}"), ca.subject, key.public_key(), days)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(names, critical=False)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(authority, critical=False)
        .sign(ca_key, hashes.SHA256())
    )


def _builder(
    subject: x509.Name, issuer: x509.Name, public_key: ec.EllipticCurvePublicKey, days: int
) -> x509.CertificateBuilder:
    # Valid from an hour ago: a host whose clock lags a little still accepts it at once.
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=days))
    )


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _subject_alt_names(hosts: Sequence[str]) -> x509.SubjectAlternativeName:
    entries: list[x509.GeneralName] = []
    for host in dict.fromkeys(h.strip() for h in hosts if h.strip()):
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            entries.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(entries)


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _private_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _write(path: Path, data: bytes, mode: int) -> Path:
    """Write with `mode` from the first byte (a replaced file is emptied and re-moded first)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    os.fchmod(fd, mode)  # the mode of a file that existed already, and despite the umask
    with os.fdopen(fd, "wb") as out:
        out.write(data)
    return path
