"""A self-signed TLS certificate for the HTTP face, made once and kept beside the store.

Usage::

    certfile, keyfile = self_signed("pipeline-data/store.db", "0.0.0.0")
    # -> pipeline-data/http-cert.pem, pipeline-data/http-key.pem (0600), reused on later starts

The certificate (ECDSA P-256, 10 years) names ``localhost``, 127.0.0.1, ::1, the host's name
and the bind address (unless it is every interface), so a client can pin it
(``httpx.Client(verify="pipeline-data/http-cert.pem")``). Made with ``cryptography``, the
well-kept library Python's own TLS stack is tested against, rather than by calling openssl.
"""

from __future__ import annotations

import datetime
import ipaddress
import socket
from pathlib import Path

from pipelines.file_perms import make_private


def self_signed(store_path: str | Path, host: str) -> tuple[str, str]:
    """``(certfile, keyfile)`` in the store's folder, made now if they do not exist yet."""
    folder = Path(store_path).parent if str(store_path) != ":memory:" else Path(".")
    make_private(folder, directory=True, create=True)
    cert_path, key_path = folder / "http-cert.pem", folder / "http-key.pem"
    if cert_path.exists() and key_path.exists():
        make_private(key_path, create=False)
        return str(cert_path), str(key_path)

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = [x509.DNSName("localhost"), x509.DNSName(socket.gethostname()),
                                     x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                                     x509.IPAddress(ipaddress.ip_address("::1"))]
    try:
        addr = ipaddress.ip_address(host.strip("[]"))
        if not addr.is_unspecified and not addr.is_loopback:
            names.append(x509.IPAddress(addr))
    except ValueError:
        if host and host != "localhost":
            names.append(x509.DNSName(host))
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"iot-pipelines {socket.gethostname()}")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=3650))
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    make_private(key_path)  # created 0600 before the key is written into it
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return str(cert_path), str(key_path)
