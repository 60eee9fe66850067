"""TLS for the agent's listener: mutual TLS with the fleet's CA, and a revocation list re-read when it changes.

With ``--tls-cert/--tls-key/--tls-ca`` the agent speaks TLS 1.2 or newer only
and requires every client to present a certificate signed by that CA: the
certificate is the client's identity, so the token becomes optional. The
protocol inside is the same newline-delimited JSON.

The revocation list (``--tls-crl``, PEM, as ``fleet ca revoke`` writes it)
is checked for the client's certificate on every handshake. When the file
changes, the next handshake builds a fresh context from the files and
continues with it (``sni_callback`` runs before the client's certificate is
checked), so a revoked controller is shut out without restarting the agent.
Standard library only (``ssl``).
"""

from __future__ import annotations

import logging
import os
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

from .contract import CONTROLLER_ROLE
from .errors import BadRequest

log = logging.getLogger(__name__)


class TLSError(ValueError):
    """The TLS files cannot be used; the message names the file and why."""


@dataclass(frozen=True)
class TLSFiles:
    cert: Path  # this device's certificate (PEM), naming its device id
    key: Path  # its private key
    ca: Path  # the fleet CA's certificate: clients must present a certificate it signed
    crl: Optional[Path] = None  # revoked certificates (PEM CRL), re-read when it changes


def server_context(files: TLSFiles) -> ssl.SSLContext:
    """A server context: TLS 1.2+, this device's certificate, client certificates required from the CA."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.options |= ssl.OP_NO_RENEGOTIATION  # the transport (agent/tls_transport.py) never reads to write
    context.verify_mode = ssl.CERT_REQUIRED
    _load(context.load_cert_chain, files.cert, "certificate and key", certfile=str(files.cert), keyfile=str(files.key))
    _load(context.load_verify_locations, files.ca, "CA certificate", cafile=str(files.ca))
    if files.crl is not None:
        _load(context.load_verify_locations, files.crl, "revocation list", cafile=str(files.crl))
        context.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
    return context


def _load(method, path: Path, what: str, **kwargs: str) -> None:  # type: ignore[no-untyped-def]
    try:
        method(**kwargs)
    except FileNotFoundError:
        raise TLSError(f"TLS {what}: {path} not found") from None
    except (ssl.SSLError, OSError) as exc:
        raise TLSError(f"TLS {what}: cannot use {path}: {exc}") from None


class ServerTLS:
    """The listener's context, rebuilt from the files when the revocation list changes."""

    def __init__(self, files: TLSFiles) -> None:
        self.files = files
        self._seen = self._crl_stamp()
        self.context = server_context(files)
        self._current = self.context
        self.context.sni_callback = self._on_hello  # type: ignore[assignment]

    def _crl_stamp(self) -> Optional[Tuple[int, int, int]]:
        if self.files.crl is None:
            return None
        try:
            info = os.stat(self.files.crl)
        except OSError:
            return None
        return info.st_ino, info.st_size, info.st_mtime_ns

    def _on_hello(self, connection: ssl.SSLObject, server_name: Optional[str], _context: ssl.SSLContext) -> None:
        """Each handshake: if the revocation list changed, continue with a context built from it."""
        stamp = self._crl_stamp()
        if stamp != self._seen:
            try:
                fresh = server_context(self.files)
            except TLSError as exc:  # a half-written file: keep the last good list, try again next time
                log.error("keeping the previous revocation list: %s", exc)
            else:
                self._current, self._seen = fresh, stamp
                log.warning("TLS revocation list %s re-read", self.files.crl)
        if self._current is not self.context:
            connection.context = self._current


CRL_MARK = "-----BEGIN X509 CRL-----"


def replace_crl(tls: Optional["ServerTLS"], pem: object) -> Dict[str, Any]:
    """``update_crl``: write a new revocation list over ``--tls-crl`` (whole or not at all), if it parses.

    The next handshake reads it (``ServerTLS._on_hello``). It is checked the
    way it will be used: a context is built from the files with it first, so a
    list that OpenSSL cannot read never replaces a good one.
    """
    if tls is None or tls.files.crl is None:
        raise BadRequest("this agent takes no revocation list: start it with --tls-cert/--tls-key/--tls-ca and "
                         "--tls-crl FILE to have one")
    if not isinstance(pem, str) or CRL_MARK not in pem:
        raise BadRequest("'crl' must be a PEM revocation list (from `fleet ca revoke`)")
    target = tls.files.crl
    try:
        old = target.read_text(encoding="ascii")
    except (OSError, UnicodeDecodeError):
        old = None
    if old == pem:
        return {"crl": str(target), "changed": False}
    candidate = target.with_name(f".{target.name}.new")
    try:
        candidate.write_text(pem, encoding="ascii")
        server_context(TLSFiles(tls.files.cert, tls.files.key, tls.files.ca, candidate))
        os.replace(candidate, target)
    except (TLSError, OSError, UnicodeEncodeError) as exc:
        candidate.unlink(missing_ok=True)
        raise BadRequest(f"the revocation list was not used: {exc}") from None
    log.warning("TLS revocation list %s replaced over the wire", target)
    return {"crl": str(target), "changed": True}


def not_a_controller(transport: Any) -> Optional[str]:
    """On a TLS connection, why its client may not give commands (its certificate is not a controller's);
    None when it may, and on plain TCP. A device's certificate is for being that device, never for commanding
    the others: whoever takes a Pi's card away gets no way into the rest of the fleet."""
    if transport.get_extra_info("sslcontext") is None:
        return None
    subject = dict(pair for rdn in (transport.get_extra_info("peercert") or {}).get("subject", ()) for pair in rdn)
    if subject.get("organizationalUnitName") == CONTROLLER_ROLE:
        return None
    return (f"a TLS client presented {subject.get('commonName', 'a certificate')!r} "
            f"({subject.get('organizationalUnitName', 'no role')}), not a controller's certificate: closed")
