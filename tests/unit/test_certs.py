"""`fmserve certs` and the TLS settings: the CA signs every certificate, the names they hold,
private keys written 0600 and never printed, and the files turned into gRPC credentials."""

from __future__ import annotations

import ipaddress
import os
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID
from pydantic import ValidationError

from fmserve.cli import main as cli
from fmserve.cli.certs import NAMES, CertsError, generate
from fmserve.cli.cluster import Cluster, Replica
from fmserve.cli.commands import security
from fmserve.core.settings import TlsSettings, settings_class
from fmserve.rpc import tls
from fmserve.rpc.channels import tls_options

SERVICES = ("gateway", "preprocess", "inference", "postprocess", "cache")


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("certs")
    generate(out, hosts=["fmserve.example.com", "10.1.2.3"], days=30)
    return out


def certificate(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def test_the_ca_signs_every_certificate(folder: Path) -> None:
    ca = certificate(folder / "ca.crt")
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    for name in NAMES:
        cert = certificate(folder / f"{name}.crt")
        cert.verify_directly_issued_by(ca)  # raises unless the CA's key signed it
        assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
        usages = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        assert {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH} <= set(usages)


def test_another_run_is_another_ca(folder: Path, tmp_path: Path) -> None:
    generate(tmp_path)
    other = certificate(tmp_path / "gateway.crt")
    with pytest.raises(InvalidSignature):
        other.verify_directly_issued_by(certificate(folder / "ca.crt"))


def test_names_cover_loopback_compose_services_and_extra_hosts(folder: Path) -> None:
    for name in NAMES:
        names = certificate(folder / f"{name}.crt").extensions.get_extension_for_class(
            x509.SubjectAlternativeName
        )
        dns = set(names.value.get_values_for_type(x509.DNSName))
        ips = set(names.value.get_values_for_type(x509.IPAddress))
        assert {"localhost", *SERVICES, "fmserve.example.com"} <= dns
        assert {ipaddress.ip_address(a) for a in ("127.0.0.1", "::1", "10.1.2.3")} <= ips


def test_each_key_belongs_to_its_certificate(folder: Path) -> None:
    for name in NAMES:
        key = serialization.load_pem_private_key((folder / f"{name}.key").read_bytes(), None)
        public = certificate(folder / f"{name}.crt").public_key()
        assert key.public_key().public_numbers() == public.public_numbers()  # type: ignore[union-attr]


def test_private_keys_are_0600_and_the_cas_key_is_never_written(folder: Path) -> None:
    for name in NAMES:
        assert stat.S_IMODE((folder / f"{name}.key").stat().st_mode) == 0o600, name
        assert stat.S_IMODE((folder / f"{name}.crt").stat().st_mode) == 0o644, name
    assert sorted(p.name for p in folder.glob("*.key")) == sorted(f"{n}.key" for n in NAMES)


def test_replacing_keeps_keys_private_whatever_the_umask(tmp_path: Path) -> None:
    generate(tmp_path)
    (tmp_path / "cache.key").chmod(0o644)  # as a careless copy may leave it
    old = os.umask(0)
    try:
        generate(tmp_path, force=True)
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "cache.key").stat().st_mode) == 0o600


def test_existing_certificates_are_not_replaced_without_force(tmp_path: Path) -> None:
    generate(tmp_path)
    before = (tmp_path / "ca.crt").read_bytes()
    with pytest.raises(CertsError, match="--force"):
        generate(tmp_path)
    assert (tmp_path / "ca.crt").read_bytes() == before


def test_the_command_lists_files_and_never_prints_a_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli(["certs", "--out", str(tmp_path), "--hosts", "api.example.com"]) == 0
    out = capsys.readouterr().out
    assert "PRIVATE KEY" not in out and str(tmp_path / "gateway.key") in out
    key_body = (tmp_path / "gateway.key").read_text().splitlines()[1]
    assert key_body not in out
    assert cli(["certs", "--out", str(tmp_path)]) == 1  # exists: refused, with a message
    assert "--force" in capsys.readouterr().err


# The files as credentials --------------------------------------------------------------------


def test_an_identity_loads_from_the_settings_and_hides_its_key(folder: Path) -> None:
    settings = TlsSettings(
        tls_cert=folder / "cache.crt", tls_key=folder / "cache.key", tls_ca=folder / "ca.crt"
    )
    identity = tls.load(settings)
    assert identity is not None and identity.key == (folder / "cache.key").read_bytes()
    assert "PRIVATE" not in repr(identity) and identity.key.decode() not in repr(identity)
    assert "cache.key" in settings.model_dump_json()  # a settings dump holds the path only
    assert tls.load(TlsSettings()) is None


def test_tls_settings_come_all_three_or_none(folder: Path) -> None:
    with pytest.raises(ValidationError, match="FMSERVE_TLS_CERT, FMSERVE_TLS_KEY"):
        TlsSettings(tls_cert=folder / "cache.crt", tls_key=folder / "cache.key")


def test_missing_or_malformed_files_are_named(folder: Path, tmp_path: Path) -> None:
    with pytest.raises(tls.TlsFilesError, match="FMSERVE_TLS_KEY: cannot read"):
        tls.from_files(folder / "ca.crt", folder / "cache.crt", tmp_path / "nothing.key")
    (tmp_path / "not-a.crt").write_text("hello")
    with pytest.raises(tls.TlsFilesError, match=r"FMSERVE_TLS_CA: .* holds no PEM certificate"):
        tls.from_files(tmp_path / "not-a.crt", folder / "cache.crt", folder / "cache.key")


def test_a_replica_list_is_checked_against_its_first_address() -> None:
    assert tls_options("127.0.0.1:1,127.0.0.1:2") == [
        ("grpc.ssl_target_name_override", "127.0.0.1")
    ]
    assert tls_options("preprocess:50052") == []  # DNS: the name itself is checked


# Exposure: where services bind, what `fmserve up` gives them and says ------------------------


def test_stages_bind_loopback_and_the_gateway_every_interface(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in SERVICES:
        monkeypatch.delenv(f"FMSERVE_{name.upper()}_HOST", raising=False)
        expected = "0.0.0.0" if name == "gateway" else "127.0.0.1"
        assert settings_class(name)().host == expected, name


def test_fmserve_up_gives_each_service_its_own_certificate(folder: Path, tmp_path: Path) -> None:
    cluster = Cluster(log_dir=tmp_path, certs=folder)
    for service in SERVICES:
        env = cluster.child_env(Replica(service, 1, 2, tmp_path / "x.log"))
        assert env["FMSERVE_TLS_CERT"] == str(folder / f"{service}.crt")
        assert env["FMSERVE_TLS_KEY"] == str(folder / f"{service}.key")
        assert env["FMSERVE_TLS_CA"] == str(folder / "ca.crt")
    assert security(cluster).startswith("TLS on")
    plain = Cluster(log_dir=tmp_path, env={"FMSERVE_TLS_CA": str(folder / "ca.crt")})
    assert security(plain) == "TLS off"
    # The CLI's CA in the shell does not half-configure a service of a plaintext cluster.
    assert "FMSERVE_TLS_CA" not in plain.child_env(Replica("cache", 1, 2, tmp_path / "x.log"))
