"""The controller's side of mutual TLS: its certificate, the fleet CA, and who answers.

A device with ``"tls": true`` in devices.json is reached over TLS 1.2+: the
controller presents its own certificate (``fleet ca issue-controller``),
accepts only an agent certificate signed by the fleet CA, and then requires
that certificate to name the device id it meant to reach (as a DNS subject
alternative name, as ``fleet ca issue`` writes it): a Pi cannot answer for
another Pi, even with a certificate from the same CA.
"""

from __future__ import annotations

import functools
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any, List, Optional

from .errors import ConfigError


@dataclass(frozen=True)
class ClientTLS:
    ca: Path  # the fleet CA's certificate
    cert: Path  # this controller's certificate
    key: Path  # and its key
    crl: Optional[Path] = None  # revoked certificates: a lost Pi's certificate must not pass for that Pi


def client_context(tls: ClientTLS) -> ssl.SSLContext:
    """One context per set of files, shared by every connection that uses them; made again when the
    revocation list changes (a long-running ``converge --watch`` sees a revocation at its next connection)."""
    try:
        stamp = tls.crl.stat().st_mtime_ns if tls.crl is not None else None
    except OSError:
        stamp = None
    return _context(tls, stamp)


@functools.lru_cache(maxsize=16)
def _context(tls: ClientTLS, crl_stamp: Optional[int]) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = False  # the device id is checked instead (``wrong_device``): ids need not be DNS names
    context.verify_mode = ssl.CERT_REQUIRED
    for what, path, load in (("CA certificate", tls.ca, lambda: context.load_verify_locations(cafile=str(tls.ca))),
                             ("certificate and key", tls.cert,
                              lambda: context.load_cert_chain(certfile=str(tls.cert), keyfile=str(tls.key)))):
        try:
            load()
        except FileNotFoundError:
            raise ConfigError(f"TLS {what}: {path} not found (`fleet ca issue-controller` writes them)") from None
        except (ssl.SSLError, OSError) as exc:
            raise ConfigError(f"TLS {what}: cannot use {path}: {exc}") from None
    if tls.crl is not None:
        try:
            context.load_verify_locations(cafile=str(tls.crl))
        except (ssl.SSLError, OSError) as exc:
            raise ConfigError(f"TLS revocation list: cannot use {tls.crl}: {exc}") from None
        context.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
    return context


def names_in(peercert: Optional[dict]) -> List[str]:
    """The DNS names (and common name) a peer's certificate carries."""
    if not peercert:
        return []
    names = [value for kind, value in peercert.get("subjectAltName", ()) if kind == "DNS"]
    names += [value for rdn in peercert.get("subject", ()) for key, value in rdn if key == "commonName"]
    return list(dict.fromkeys(names))


def identity_problem(transport: Any, device_id: str) -> Optional[str]:
    """Why the agent on ``transport`` is not ``device_id`` (its certificate names another), or None."""
    peercert = transport.get_extra_info("peercert") or {}
    if device_id in [value for kind, value in peercert.get("subjectAltName", ()) if kind == "DNS"]:
        return None
    shown = ", ".join(names_in(peercert)) or "nothing"
    return (f"the agent there presented a certificate for {shown}, not {device_id}: a device cannot answer for "
            "another (is the inventory's host for this device right?)")


def explain(exc: BaseException) -> str:
    """A TLS failure the controller saw itself (the agent's certificate), in words a person can act on."""
    text = str(exc)
    if "certificate revoked" in text:
        return f"TLS refused: the agent's certificate has been revoked (`fleet ca revoke`): a lost or stolen Pi? ({text})"
    if "CERTIFICATE_VERIFY_FAILED" in text.upper():
        return f"TLS refused: the agent's certificate is not from this fleet's CA, or has expired ({text})"
    if "WRONG_VERSION_NUMBER" in text.upper():
        return f"TLS failed: the agent does not speak TLS here (plain TCP?): check 'tls' in devices.json ({text})"
    return f"TLS failed: {text}"


def refusal(tls: ClientTLS) -> str:
    """Why the agent closed the connection right after the handshake: it refused our certificate.

    The agent's side closes without saying why (asyncio does not send the
    alert), so the controller looks at its own certificate: expired, or not
    from the CA it trusts, is said exactly; otherwise it may have been revoked.
    """
    problem = own_certificate_problem(tls)
    return ("TLS refused: the agent refused this controller's certificate: "
            + (problem or "it may have been revoked (`fleet ca list`), or be from a CA this agent does not trust")
            + "; nothing ran")


@functools.lru_cache(maxsize=16)
def own_certificate_problem(tls: ClientTLS) -> Optional[str]:
    """What is wrong with this controller's own certificate that an agent would refuse, or None."""
    import datetime

    from cryptography import x509
    from cryptography.exceptions import InvalidSignature

    try:
        mine = x509.load_pem_x509_certificate(tls.cert.read_bytes())
        ca = x509.load_pem_x509_certificate(tls.ca.read_bytes())
    except (OSError, ValueError):
        return None
    now = datetime.datetime.now(datetime.timezone.utc)
    if mine.not_valid_after_utc < now:
        return f"it expired on {mine.not_valid_after_utc:%Y-%m-%d} (`fleet ca issue-controller` makes a new one)"
    try:
        mine.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return f"it was not issued by the fleet CA in {tls.ca} (it names {mine.issuer.rfc4514_string()})"
    return None
