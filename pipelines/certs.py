"""A project CA, the router's DTLS certificate and device certificates (EC P-256, ``cryptography``).

Usage (``pipeline certs init-ca`` and ``pipeline devices add-cert`` call these)::

    files = init_ca("demo", Path("pki"))          # pki/ca.pem ca.key server.pem server.key
    dev = issue_device_cert("cam-07", "demo", Path("pki"), Path("pki/devices"))
    dev.cert, dev.key                               # pki/devices/cam-07.pem, cam-07.key

    pipeline serve --coap-dtls-port 5684 --registry devices.yaml \\
        --dtls-cert pki/server.pem --dtls-key pki/server.key --dtls-ca pki/ca.pem

Device certificates name the device as Golioth's do: subject CN = device id, O = project id;
the DTLS server maps that subject to the registry entry. The router's certificate carries the
host names and addresses given (default ``localhost`` and ``127.0.0.1``) as subjectAltName.
Private keys are written with mode 0600 and never printed; existing files are not overwritten.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_DAYS = 3650
CERT_DAYS = 825


class CertError(ValueError):
    """Bad input or files in the way; the message says which."""


@dataclass(frozen=True)
class CertFiles:
    cert: Path
    key: Path


@dataclass(frozen=True)
class CaFiles:
    ca: CertFiles
    server: CertFiles


def _write_new(path: Path, data: bytes, private: bool) -> None:
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
    try:
        fd = os.open(path, flags, 0o600 if private else 0o644)
    except FileExistsError:
        raise CertError(f"{path} exists already: not overwriting it") from None
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _name(common: str, org: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common),
                      x509.NameAttribute(NameOID.ORGANIZATION_NAME, org)])


def _builder(subject: x509.Name, issuer: x509.Name, public_key, days: int) -> x509.CertificateBuilder:
    now = dt.datetime.now(dt.UTC)
    return (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days)))


def _check_id(what: str, value: str) -> None:
    from pipelines.devices import _ID_RE  # the registry's own rule for ids

    if not _ID_RE.match(value):
        raise CertError(f"{what} {value!r} is not valid: letters, digits, '.', '_', ':' or '-'")


def _load_ca(ca_dir: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    try:
        cert = x509.load_pem_x509_certificate((ca_dir / "ca.pem").read_bytes())
        key = serialization.load_pem_private_key((ca_dir / "ca.key").read_bytes(), password=None)
    except FileNotFoundError as exc:
        raise CertError(f"no project CA in {ca_dir}: {exc.filename} is missing "
                        "(create one with `pipeline certs init-ca`)") from None
    except ValueError as exc:
        raise CertError(f"{ca_dir}: the CA certificate or key is not valid PEM: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CertError(f"{ca_dir}/ca.key is not an EC key")
    return cert, key


def init_ca(project: str, out: Path, server_names: list[str] | None = None) -> CaFiles:
    """Create ``ca.pem``/``ca.key`` (the project CA) and ``server.pem``/``server.key`` in ``out``."""
    _check_id("project id", project)
    out.mkdir(parents=True, exist_ok=True)
    for name in ("ca.pem", "ca.key", "server.pem", "server.key"):
        if (out / name).exists():
            raise CertError(f"{out / name} exists already: not overwriting it")
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = _name(f"{project} device CA", project)
    ca_cert = (_builder(ca_name, ca_name, ca_key.public_key(), CA_DAYS)
               .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False,
                                            key_encipherment=False, data_encipherment=False,
                                            key_agreement=False, key_cert_sign=True, crl_sign=True,
                                            encipher_only=False, decipher_only=False), critical=True)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
               .sign(ca_key, hashes.SHA256()))
    names = server_names or ["localhost", "127.0.0.1"]
    alt: list[x509.GeneralName] = []
    for n in names:
        try:
            alt.append(x509.IPAddress(ipaddress.ip_address(n)))
        except ValueError:
            alt.append(x509.DNSName(n))
    server_key = ec.generate_private_key(ec.SECP256R1())
    server_cert = (_builder(_name(names[0], project), ca_name, server_key.public_key(), CERT_DAYS)
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                   .add_extension(x509.SubjectAlternativeName(alt), critical=False)
                   .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
                   .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                                  critical=False)
                   .sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    _write_new(out / "ca.key", _key_pem(ca_key), private=True)
    _write_new(out / "ca.pem", ca_cert.public_bytes(pem), private=False)
    _write_new(out / "server.key", _key_pem(server_key), private=True)
    _write_new(out / "server.pem", server_cert.public_bytes(pem), private=False)
    return CaFiles(CertFiles(out / "ca.pem", out / "ca.key"), CertFiles(out / "server.pem", out / "server.key"))


def issue_device_cert(device: str, project: str, ca_dir: Path, out: Path) -> CertFiles:
    """Issue ``<device>.pem``/``<device>.key`` in ``out``: CN = device id, O = project id."""
    _check_id("device id", device)
    _check_id("project id", project)
    ca_cert, ca_key = _load_ca(ca_dir)
    ca_orgs = ca_cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)
    if ca_orgs and ca_orgs[0].value != project:
        raise CertError(f"the CA in {ca_dir} is project {ca_orgs[0].value!r}'s, not {project!r}'s")
    out.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = out / f"{device}.pem", out / f"{device}.key"
    for path in (cert_path, key_path):
        if path.exists():
            raise CertError(f"{path} exists already: not overwriting it")
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (_builder(_name(device, project), ca_cert.subject, key.public_key(), CERT_DAYS)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    _write_new(key_path, _key_pem(key), private=True)
    _write_new(cert_path, cert.public_bytes(serialization.Encoding.PEM), private=False)
    return CertFiles(cert_path, key_path)
