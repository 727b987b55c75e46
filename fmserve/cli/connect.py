"""The gateway client every CLI command uses: the address, TLS and the API key come from the
command line and the settings (FMSERVE_TLS_CA, FMSERVE_CERTS, FMSERVE_TLS, FMSERVE_API_KEY)."""

from __future__ import annotations

import argparse

from fmserve.client import Client
from fmserve.core.settings import ClientSettings


class InputError(ValueError):
    """An input the CLI cannot use (a file, a line of it); the message names it."""


def gateway_client(args: argparse.Namespace) -> Client:
    settings: ClientSettings = args.settings
    api_key = settings.api_key.get_secret_value()
    ca = settings.tls_ca or (settings.certs / "ca.crt" if settings.certs else None)
    if ca is None:
        return Client(args.address, tls=settings.tls, api_key=api_key)
    try:
        return Client(args.address, root_certificates=ca.read_bytes(), api_key=api_key)
    except OSError as exc:
        raise InputError(f"cannot read the CA certificate {ca}: {exc.strerror}") from None
