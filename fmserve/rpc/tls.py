"""The cluster's certificates as gRPC credentials: what a server presents and asks of its
clients, and what a channel to another service trusts and presents.

A process's `Identity` is read at start from the files its settings name. The private key
lives in memory only: it is kept out of the repr, and no message here quotes a file's content."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import grpc

if TYPE_CHECKING:  # the health check imports this module, and stays clear of pydantic
    from fmserve.core.settings import TlsSettings


class TlsFilesError(RuntimeError):
    """A certificate or key file named in the settings cannot be used; the message says which."""


@dataclass(frozen=True)
class Identity:
    """A process's certificate and key, and the CA it trusts (all PEM)."""

    ca: bytes
    cert: bytes
    key: bytes = field(repr=False)

    def server_credentials(self, require_client_auth: bool) -> grpc.ServerCredentials:
        """Present the certificate; with `require_client_auth`, refuse at the handshake every
        client without a certificate the CA signed (mTLS)."""
        # Without client auth no CA is given: a public client is not even asked for a certificate.
        return grpc.ssl_server_credentials(
            [(self.key, self.cert)],
            root_certificates=self.ca if require_client_auth else None,
            require_client_auth=require_client_auth,
        )

    def channel_credentials(self) -> grpc.ChannelCredentials:
        """Trust only the cluster's CA, and present this process's certificate to the server."""
        return grpc.ssl_channel_credentials(
            root_certificates=self.ca, private_key=self.key, certificate_chain=self.cert
        )


def load(settings: TlsSettings) -> Identity | None:
    """The process's identity, or None when TLS is off (no files named)."""
    if not (settings.tls_cert and settings.tls_key and settings.tls_ca):
        return None
    return from_files(settings.tls_ca, settings.tls_cert, settings.tls_key)


def from_folder(folder: Path, name: str) -> Identity:
    """`name`'s identity in a folder `fmserve certs` wrote: `ca.crt`, `NAME.crt`, `NAME.key`."""
    return from_files(folder / "ca.crt", folder / f"{name}.crt", folder / f"{name}.key")


def from_files(ca: Path, cert: Path, key: Path) -> Identity:
    return Identity(
        ca=_read(ca, "FMSERVE_TLS_CA", "CERTIFICATE"),
        cert=_read(cert, "FMSERVE_TLS_CERT", "CERTIFICATE"),
        key=_read(key, "FMSERVE_TLS_KEY", "PRIVATE KEY"),
    )


def _read(path: Path, variable: str, kind: str) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise TlsFilesError(f"{variable}: cannot read {path}: {exc.strerror}") from None
    # gRPC reports a malformed PEM only at the first handshake, and vaguely: check the form here.
    if b"-----BEGIN" not in data or kind.encode() not in data:
        raise TlsFilesError(f"{variable}: {path} holds no PEM {kind.lower()}")
    return data
