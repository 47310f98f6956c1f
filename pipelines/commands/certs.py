"""``pipeline certs``: the project CA and the router's certificate for DTLS certificate devices.

    pipeline certs init-ca --project demo --out pki          # pki/ca.pem ca.key server.pem server.key
    pipeline certs init-ca --project demo --out pki --server-name coap.example.net --server-name 192.0.2.10
    pipeline devices add-cert cam-07 --project demo --ca-dir pki --out pki/devices --registry devices.yaml
    pipeline serve --coap-dtls-port 5684 --registry devices.yaml \\
        --dtls-cert pki/server.pem --dtls-key pki/server.key --dtls-ca pki/ca.pem

Keys are EC P-256, written with mode 0600; existing files are never overwritten.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from pipelines.certs import CertError, init_ca


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser("certs", help="create the project CA and the router's DTLS certificate",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="certs_command", metavar="ACTION")
    init = sub.add_parser("init-ca", help="create a project CA and the router's server certificate")
    init.add_argument("--project", required=True, help="project id (the O of every device certificate)")
    init.add_argument("--out", required=True, help="directory for ca.pem, ca.key, server.pem, server.key")
    init.add_argument("--server-name", action="append", default=None, metavar="NAME",
                      help="host name or address devices connect to (repeatable; default localhost, 127.0.0.1)")
    init.set_defaults(func=run)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if getattr(args, "certs_command", None) != "init-ca":
        print("pipeline certs: choose an action: init-ca", file=sys.stderr)
        return 2
    try:
        files = init_ca(args.project, Path(args.out), args.server_name)
    except CertError as exc:
        print(f"pipeline certs init-ca: {exc}", file=sys.stderr)
        return 1
    print(f"project CA for {args.project}: {files.ca.cert} (key {files.ca.key}, keep it offline)")
    print(f"router certificate: {files.server.cert} (key {files.server.key})")
    print(f"serve with: --dtls-cert {files.server.cert} --dtls-key {files.server.key} --dtls-ca {files.ca.cert}")
    return 0
