"""The TLS part of ``fedseal keys init``: a CA, the SuperLink certificate and SuperNode keys.

    fedseal keys init --out keys/ --nodes 3 --tls [--san superlink.example.org] [--ca-cert ca.crt --ca-key ca.key]

Writes ``keys/tls/`` (``ca.crt``, ``ca.key`` unless the CA was given,
``server.pem``, ``server.key``) and, with ``--nodes``,
``keys/auth/node-<id>/`` (``auth.key``, ``auth.pub``); see ``deploy.pki``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_tls_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the TLS options to the ``keys init`` parser."""
    parser.add_argument("--tls", action="store_true", help="also create a CA, the SuperLink certificate and (with --nodes) SuperNode authentication keys")
    parser.add_argument("--ca-cert", help="sign the SuperLink certificate with this CA certificate (PEM) instead of a new CA; implies --tls")
    parser.add_argument("--ca-key", help="private key (PEM, unencrypted) of --ca-cert")
    parser.add_argument("--san", action="append", default=[], help="extra host name or IP address for the SuperLink certificate (repeatable); 127.0.0.1 and localhost are always included")


def check_tls_arguments(args: argparse.Namespace) -> str | None:
    """Return why the TLS options are invalid, or None when they are fine."""
    if bool(args.ca_cert) != bool(args.ca_key):
        return "pass --ca-cert and --ca-key together, or neither to create a new CA."
    if args.san and not (args.tls or args.ca_cert):
        return "--san only applies with --tls; add --tls."
    for option, value in (("--ca-cert", args.ca_cert), ("--ca-key", args.ca_key)):
        if value and not Path(value).is_file():
            return f"{option} {value} not found; pass the path of a PEM file."
    return None


def tls_keys_init(args: argparse.Namespace) -> int:
    """Write the TLS material and SuperNode keys; return the exit code."""
    from deploy import pki

    hosts = [*pki.DEFAULT_HOSTS, *args.san]
    try:
        files = pki.init_tls(Path(args.out), hosts, args.ca_cert, args.ca_key, overwrite=args.overwrite)
        # The he_robust trust validator is one more SuperNode, node N.
        supernodes = args.nodes + 1 if getattr(args, "validator", False) else args.nodes
        auth = pki.init_node_auth_keys(Path(args.out), supernodes, overwrite=args.overwrite) if args.nodes else []
    except (FileExistsError, FileNotFoundError, ValueError, TypeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1

    print(f"TLS: CA {files.ca_cert} (give it to every site and to the flwr CLI)")
    if files.ca_key is not None:
        print(f"  CA key (mode 0600; keep it offline, never on the SuperLink): {files.ca_key}")
    print(f"  SuperLink certificate for {', '.join(dict.fromkeys(hosts))}: {files.server_cert}, key {files.server_key}")
    if auth:
        print(f"SuperNode authentication keys (P-384, OpenSSH) for {len(auth)} nodes in {Path(args.out) / pki.AUTH_DIR}")
        print("  register each auth.pub with `flwr supernode register`; install auth.key on that site only")
    return 0
