"""The fleet's own certificate authority: one CA, a certificate per device and per controller, and a CRL.

Keys and certificates are made with ``cryptography`` (the standard library
cannot make them); the agent only reads the files, with ``ssl``. The CA lives
in a folder (``.pifleet/ca/`` beside the state file, or ``--ca-dir``):

    ca.key      the CA's private key (mode 0600): whoever holds it can make devices and controllers
    ca.crt      the CA's certificate: every agent and controller trusts it
    crl.pem     revoked certificates, signed by the CA; agents re-read it when it changes
    issued.json what was issued: name, kind, serial, expiry, and whether it was revoked

Keys are ECDSA P-256: small, and a handshake on a Pi costs a fraction of an
RSA one. A device certificate names its device id as common name and as a
DNS subject alternative name, and may serve and connect (server and client
auth), so a controller can check that the agent answering is the device it
meant to reach. Each certificate's organizational unit says its role
(``contract.CONTROLLER_ROLE`` or ``DEVICE_ROLE``): agents take commands only
from controllers, never from another device's certificate.
"""

from __future__ import annotations

import datetime
import json
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from agent.contract import BROKER_ROLE, CONTROLLER_ROLE, DEVICE_ROLE

from .errors import ConfigError

DEVICE_DAYS = 825  # a device certificate's life
CA_DAYS = 3650
CRL_DAYS = 365  # agents refuse clients once a CRL is past its next update: re-run `fleet ca revoke` to renew


@dataclass(frozen=True)
class Issued:
    """Where ``issue`` wrote a certificate, its key and the CA certificate."""

    name: str
    cert: Path
    key: Path
    ca: Path
    serial: int


class FleetCA:
    """``FleetCA(folder)``; ``init()`` once, then ``issue``, ``issue_controller``, ``revoke``."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.key_path = self.folder / "ca.key"
        self.cert_path = self.folder / "ca.crt"
        self.crl_path = self.folder / "crl.pem"
        self.index_path = self.folder / "issued.json"

    @property
    def exists(self) -> bool:
        return self.key_path.exists() and self.cert_path.exists()

    def init(self, name: str = "pifleet CA", days: int = CA_DAYS) -> None:
        if self.exists:
            raise ConfigError(f"there is a CA in {self.folder} already; it is kept (a new one would orphan every "
                              "certificate it issued)")
        self.folder.mkdir(parents=True, exist_ok=True)
        os.chmod(self.folder, 0o700)
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = _now()
        cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
                .serial_number(x509.random_serial_number()).not_valid_before(now - _SKEW)
                .not_valid_after(now + datetime.timedelta(days=days))
                .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                             data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                             crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
                .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
                .sign(key, hashes.SHA256()))
        _write(self.key_path, _key_pem(key), 0o600)
        _write(self.cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)
        self._save_index([])
        self._write_crl([])

    def issue(self, device_id: str, out: Path, *, days: int = DEVICE_DAYS, valid_from: Optional[datetime.datetime] = None,
              kind: str = "device", hosts: Sequence[str] = ()) -> Issued:
        """A key and certificate for ``device_id`` in ``out``, with ca.crt. ``kind``: a device (server and client
        auth), a controller (client), or an MQTT broker (server, for ``hosts``: the names and addresses clients
        dial, which TLS checks)."""
        ca_key, ca_cert = self._load()
        index = self._index()
        if any(e["name"] == device_id and e["kind"] == kind and not e["revoked"] for e in index):
            raise ConfigError(f"{device_id} already has a {kind} certificate from this CA; revoke it first "
                              f"(`fleet ca revoke {device_id}`) to issue another")
        key = ec.generate_private_key(ec.SECP256R1())
        start = valid_from or (_now() - _SKEW)
        usages = {"device": [ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.SERVER_AUTH],
                  "controller": [ExtendedKeyUsageOID.CLIENT_AUTH], "broker": [ExtendedKeyUsageOID.SERVER_AUTH]}[kind]
        serial = x509.random_serial_number()
        cert = (x509.CertificateBuilder()
                .subject_name(x509.Name([
                    x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, ROLES[kind]),
                    x509.NameAttribute(NameOID.COMMON_NAME, device_id)]))
                .issuer_name(ca_cert.subject).public_key(key.public_key()).serial_number(serial)
                .not_valid_before(start).not_valid_after(start + datetime.timedelta(days=days))
                .add_extension(x509.SubjectAlternativeName(_alt_names(hosts or [device_id])), critical=False)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
                .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
                .sign(ca_key, hashes.SHA256()))
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        issued = Issued(device_id, out / f"{kind}.crt", out / f"{kind}.key", out / "ca.crt", serial)
        _write(issued.key, _key_pem(key), 0o600)
        _write(issued.cert, cert.public_bytes(serialization.Encoding.PEM), 0o644)
        _write(issued.ca, self.cert_path.read_bytes(), 0o644)
        if kind == "device":  # the Pi's --tls-crl starts as the list of today
            _write(out / "crl.pem", self.crl_path.read_bytes(), 0o644)
        index.append({"name": device_id, "kind": kind, "serial": str(serial), "not_after": cert.not_valid_after_utc
                      .isoformat(), "revoked": False})
        self._save_index(index)
        return issued

    def revoke(self, name: str) -> List[int]:
        """Revoke every live certificate issued to ``name`` (a device id or a controller); the serials revoked."""
        ca_key, _ = self._load()
        index = self._index()
        hits = [e for e in index if e["name"] == name and not e["revoked"]]
        if not hits:
            raise ConfigError(f"no live certificate named {name!r} in {self.index_path} (`fleet ca list` shows them)")
        for entry in hits:
            entry["revoked"] = True
            entry["revoked_at"] = _now().isoformat()
        self._save_index(index)
        self._write_crl([int(e["serial"]) for e in index if e["revoked"]])
        return [int(e["serial"]) for e in hits]

    def issued(self) -> List[Dict[str, Any]]:
        return self._index()

    # Files

    def _load(self) -> Any:
        if not self.exists:
            raise ConfigError(f"no CA in {self.folder}: run `fleet ca init` first (or give --ca-dir)")
        try:
            key = serialization.load_pem_private_key(self.key_path.read_bytes(), password=None)
            cert = x509.load_pem_x509_certificate(self.cert_path.read_bytes())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot read the CA in {self.folder}: {exc}") from None
        return key, cert

    def _index(self) -> List[Dict[str, Any]]:
        try:
            return list(json.loads(self.index_path.read_text()))
        except FileNotFoundError:
            return []

    def _save_index(self, index: List[Dict[str, Any]]) -> None:
        _write(self.index_path, json.dumps(index, indent=2).encode() + b"\n", 0o600)

    def _write_crl(self, serials: List[int]) -> None:
        key, cert = self._load()
        now = _now()
        builder = (x509.CertificateRevocationListBuilder().issuer_name(cert.subject).last_update(now - _SKEW)
                   .next_update(now + datetime.timedelta(days=CRL_DAYS)))
        for serial in serials:
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(now - _SKEW).build())
        crl = builder.sign(key, hashes.SHA256())
        _write(self.crl_path, crl.public_bytes(serialization.Encoding.PEM), 0o644)


_SKEW = datetime.timedelta(minutes=5)  # a Pi's clock may run a little behind the controller's


ROLES = {"device": DEVICE_ROLE, "controller": CONTROLLER_ROLE, "broker": BROKER_ROLE}


def _alt_names(hosts: Sequence[str]) -> List[x509.GeneralName]:
    """Subject alternative names: an IP address as one, anything else as a DNS name."""
    names: List[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return names


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _write(path: Path, data: bytes, mode: int) -> None:
    """Write a file whole or not at all (a temporary file, then a rename), with ``mode`` from the start."""
    temporary = path.with_name(f".{path.name}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.chmod(temporary, mode)
    os.replace(temporary, path)
