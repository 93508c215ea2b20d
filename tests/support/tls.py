"""A test CA and a certificate for the loopback addresses, written where a router reads them."""

from __future__ import annotations

from pathlib import Path

import trustme


def loopback_cert(directory: Path) -> tuple[trustme.CA, Path, Path]:
    """(the CA, cert.pem with its chain, key.pem) for 127.0.0.1 and localhost, in ``directory``."""
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert.private_key_and_cert_chain_pem.write_to_path(str(cert_path))
    cert.private_key_pem.write_to_path(str(key_path))
    return ca, cert_path, key_path
