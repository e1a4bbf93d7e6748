"""The provider's own certificate authority and server certificate.

``sgw provider init`` makes a CA (ECDSA P-256, ten years) and a server certificate it
signs (two years) for the names the provider is reached by, under ``DATA_DIR/tls/``:
``ca.pem`` is what every gateway pins (given at deploy time), ``ca.key`` and
``server.key`` are secrets (mode 0600). A private CA instead of a public one: gateways
trust exactly this provider, not every CA of a system trust store, and no outside
service is needed to run a provider.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import socket
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from sgw.common.errors import ConfigError
from sgw.common.files import write_atomically

TLS_DIR = "tls"
CA_CERT = "ca.pem"
CA_KEY = "ca.key"
SERVER_CERT = "server.pem"
SERVER_KEY = "server.key"
CA_DAYS = 3650
# Two years: a leaked server key stops being useful eventually, and renewing (delete
# server.pem and server.key, run `sgw provider init` again) is rare.
SERVER_DAYS = 730
DEFAULT_NAMES = ("localhost", "127.0.0.1", "::1")


@dataclass(frozen=True)
class TlsFiles:
    """Paths of the provider's TLS material."""

    directory: str

    @property
    def ca_cert(self) -> str:
        return os.path.join(self.directory, CA_CERT)

    @property
    def ca_key(self) -> str:
        return os.path.join(self.directory, CA_KEY)

    @property
    def server_cert(self) -> str:
        return os.path.join(self.directory, SERVER_CERT)

    @property
    def server_key(self) -> str:
        return os.path.join(self.directory, SERVER_KEY)

    def exist(self) -> bool:
        return os.path.exists(self.server_cert) and os.path.exists(self.server_key)


def tls_files(data_dir: str) -> TlsFiles:
    return TlsFiles(os.path.join(data_dir, TLS_DIR))


def create(data_dir: str, names: list[str]) -> TlsFiles:
    """Makes the CA (unless there is one) and a new server certificate for ``names`` plus
    localhost and this host's name."""
    files = tls_files(data_dir)
    os.makedirs(files.directory, mode=0o700, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    if os.path.exists(files.ca_cert):
        ca_key = _load_key(files.ca_key)
        with open(files.ca_cert, "rb") as f:
            ca_cert = x509.load_pem_x509_certificate(f.read())
    else:
        ca_key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "sgw provider CA")])
        ca_cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(ca_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=CA_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    key_cert_sign=True,
                    crl_sign=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False
            )
            .sign(ca_key, hashes.SHA256())
        )
        write_atomically(files.ca_key, _key_pem(ca_key), mode=0o600)
        write_atomically(
            files.ca_cert, ca_cert.public_bytes(serialization.Encoding.PEM), mode=0o644
        )
    all_names = list(dict.fromkeys([*names, socket.gethostname(), *DEFAULT_NAMES]))
    server_key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, all_names[0])]))
        .issuer_name(ca_cert.subject)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=SERVER_DAYS))
        .add_extension(x509.SubjectAlternativeName([_san(n) for n in all_names]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    write_atomically(files.server_key, _key_pem(server_key), mode=0o600)
    write_atomically(files.server_cert, cert.public_bytes(serialization.Encoding.PEM), mode=0o644)
    return files


def _san(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _load_key(path: str) -> ec.EllipticCurvePrivateKey:
    try:
        with open(path, "rb") as f:
            key = serialization.load_pem_private_key(f.read(), password=None)
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read the provider's CA key {path}: {e}") from e
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ConfigError(f"{path} is not an ECDSA key; remove the tls directory to start over")
    return key
