"""Certificates and keys for a deployment (`medae certs`, `medae keys`).

- `make_certs`: a private certificate authority and the server's TLS
  certificate for the given DNS names / IP addresses. Sites receive only
  ``ca.crt``; ``ca.key`` stays with the coordinator (offline is best).
- `make_site_key`: a site's authentication key pair in the format Flower's
  SuperNode reads (``--auth-supernode-private-key``: OpenSSH, NIST P-384).
  The private key stays at the site; the coordinator authorizes the ``.pub``.

Private keys are written with owner-only permissions (0600) and nothing is
ever overwritten: an existing file is an error, so a key cannot be replaced
by accident.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from medae_core.errors import MedaeError

CA_DAYS = 3650
SERVER_DAYS = 825  # the longest lifetime clients commonly accept for a TLS server certificate
LOOPBACK_NAMES = ("localhost", "127.0.0.1")
SITE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class PkiError(MedaeError):
    """Certificates or keys cannot be written."""


def _write(path: Path, data: bytes, private: bool) -> Path:
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
    try:
        fd = os.open(path, flags, 0o600 if private else 0o644)
    except FileExistsError:
        raise PkiError(f"{path} exists; medae never overwrites keys or certificates (move it away first)") from None
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    return path


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _subject_names(names: list[str]) -> list[x509.GeneralName]:
    out: list[x509.GeneralName] = []
    for name in names:
        try:
            out.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            out.append(x509.DNSName(name))
    return out


def make_certs(out: str | Path, server_names: list[str]) -> dict[str, Path]:
    """Write ca.crt, ca.key, server.crt and server.key into ``out``.

    The certificate names ``server_names`` and, always, localhost and 127.0.0.1.
    """
    if not server_names:
        raise PkiError("give at least one --server-name (the DNS name or IP address sites connect to)")
    # The coordinator's own processes reach the SuperLink on loopback with the same certificate.
    server_names = list(dict.fromkeys([*server_names, *LOOPBACK_NAMES]))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True, mode=0o700)
    now = datetime.datetime.now(datetime.timezone.utc)

    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "medae federation CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
        .sign(ca_key, hashes.SHA384())
    )

    server_key = ec.generate_private_key(ec.SECP384R1())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, server_names[0])]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=SERVER_DAYS))
        .add_extension(x509.SubjectAlternativeName(_subject_names(server_names)), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    pem = serialization.Encoding.PEM
    return {
        "ca_cert": _write(out / "ca.crt", ca_cert.public_bytes(pem), private=False),
        "ca_key": _write(out / "ca.key", _pem_key(ca_key), private=True),
        "server_cert": _write(out / "server.crt", server_cert.public_bytes(pem), private=False),
        "server_key": _write(out / "server.key", _pem_key(server_key), private=True),
    }


def make_site_key(out: str | Path, site: str) -> dict[str, Path]:
    """Write SITE.key (OpenSSH private, 0600) and SITE.pub into ``out``."""
    if not SITE_NAME.match(site):
        raise PkiError(f"site name {site!r}: use letters, digits, '.', '_' or '-' (at most 64 characters)")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True, mode=0o700)
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return {
        "private": _write(out / f"{site}.key", private, private=True),
        "public": _write(out / f"{site}.pub", public + f" medae-site:{site}\n".encode(), private=False),
    }
