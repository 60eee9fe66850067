"""Signed code: with ``--trusted-keys DIR``, the agent runs only code a trusted release key signed.

Each handler file is signed for its name and its sha256 (``contract.signed_message``)
with an Ed25519 key (``fleet keys init``). A push carries ``signature`` (base64)
and ``key_id``; the agent verifies it before anything else happens and keeps
it (``.state/signatures/NAME.py/SHA256.json``), so that a rollback to that
version, a reload, and the next start can verify it again. Code it cannot
verify is refused (``unsigned``, ``bad_signature``) and nothing changes: a
push, a rollback to a version that came without a signature, and a file
found in ``handlers/`` at start alike.

``DIR`` holds one or more public keys (``*.pub``, PEM): a key is rotated by
adding the new one, signing with it, then removing the old one. Verifying
needs the ``cryptography`` package, which Raspberry Pi OS ships as
``python3-cryptography``; the agent refuses to start with ``--trusted-keys``
without it. Without ``--trusted-keys`` nothing is verified (see the README).
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os
from pathlib import Path
from typing import Any, Dict, Optional

from .contract import key_id, signed_message
from .errors import AgentError
from . import contract

log = logging.getLogger(__name__)

MISSING_PACKAGE = ("--trusted-keys needs the cryptography package to verify signatures: install it with "
                   "`sudo apt install python3-cryptography` (Raspberry Pi OS, Debian) or `pip install cryptography`")


class Unsigned(AgentError):
    code = contract.UNSIGNED


class BadSignature(AgentError):
    code = contract.BAD_SIGNATURE


class TrustedKeysError(ValueError):
    """The trusted keys cannot be used; the message says why (the CLI refuses to start)."""


class TrustedKeys:
    """The public keys in a folder, by key id; ``verify`` raises ``Unsigned`` or ``BadSignature``."""

    def __init__(self, folder: Path) -> None:
        try:
            from cryptography.exceptions import InvalidSignature
            from cryptography.hazmat.primitives import serialization
            from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
        except ImportError:
            raise TrustedKeysError(MISSING_PACKAGE) from None
        self._invalid = InvalidSignature
        self._load_pem, self._ed25519, self._serialization = (serialization.load_pem_public_key, Ed25519PublicKey,
                                                               serialization)
        self.folder = Path(folder)
        self.keys: Dict[str, Any] = {}
        self._stamp = self._folder_stamp()
        self.keys = self._read()

    def _folder_stamp(self) -> Any:
        try:
            return [(p.name, p.stat().st_mtime_ns) for p in sorted(self.folder.glob("*.pub"))]
        except OSError as exc:
            raise TrustedKeysError(f"--trusted-keys {self.folder}: {exc.strerror or exc}") from None

    def refresh(self) -> None:
        """Read the folder again if a key was added, changed or removed: rotation needs no restart. A folder
        left without usable keys keeps the last good set (and says so in the log)."""
        stamp = self._folder_stamp()
        if stamp == self._stamp:
            return
        try:
            self.keys = self._read()
        except TrustedKeysError as exc:
            log.error("keeping the trusted keys read before: %s", exc)
            return
        self._stamp = stamp
        log.warning("trusted keys re-read from %s: %s", self.folder, ", ".join(sorted(self.keys)))

    def _read(self) -> Dict[str, Any]:
        keys: Dict[str, Any] = {}
        serialization, folder = self._serialization, self.folder
        for path in sorted(self.folder.glob("*.pub")):
            try:
                key = self._load_pem(path.read_bytes())
            except (OSError, ValueError) as exc:
                raise TrustedKeysError(f"--trusted-keys: {path} is not a PEM public key: {exc}") from None
            if not isinstance(key, self._ed25519):
                raise TrustedKeysError(f"--trusted-keys: {path} is not an Ed25519 key (`fleet keys init` makes one)")
            raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
            keys[key_id(raw)] = key
        if not keys:
            raise TrustedKeysError(f"--trusted-keys {folder}: no public keys (*.pub) there; copy release.pub from "
                                   "`fleet keys init` into it")
        return keys

    def verify(self, filename: str, version: str, signature: Any, signer: Any) -> None:
        self.refresh()
        if signature is None and signer is None:
            raise Unsigned(f"{filename} comes without a signature, and this agent runs only signed code "
                           "(--trusted-keys); nothing was changed. Sign the release (`fleet keys init`, then "
                           "deploy with the key)")
        if not isinstance(signature, str) or not isinstance(signer, str):
            raise BadSignature("'signature' (base64) and 'key_id' must both be strings; nothing was changed")
        key = self.keys.get(signer)
        if key is None:
            raise BadSignature(f"{filename} is signed with key {signer}, which this agent does not trust (it trusts "
                               f"{', '.join(sorted(self.keys))}); nothing was changed")
        try:
            key.verify(base64.b64decode(signature, validate=True), signed_message(filename, version))
        except (self._invalid, binascii.Error, ValueError):
            raise BadSignature(f"the signature of {filename} does not verify for this code ({version[:12]}) with "
                               f"key {signer}: changed in transit, or signed for another file; nothing was "
                               "changed") from None


class SignatureStore:
    """The signature each version came with, kept to verify it again later (rollback, reload, start)."""

    def __init__(self, state: Path) -> None:
        self.folder = state / "signatures"

    def _path(self, filename: str, version: str) -> Path:
        return self.folder / filename / f"{version}.json"

    def save(self, filename: str, version: str, signature: str, signer: str) -> None:
        path = self._path(filename, version)
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_suffix(".tmp")
        temporary.write_text(json.dumps({"signature": signature, "key_id": signer}))
        os.replace(temporary, path)

    def get(self, filename: str, version: str) -> Optional[Dict[str, str]]:
        try:
            return dict(json.loads(self._path(filename, version).read_text()))
        except (OSError, ValueError):
            return None


class Trust:
    """What the deploy pipeline asks: may this code run? (``None`` in its place: signatures are off.)"""

    def __init__(self, keys: TrustedKeys, state: Path) -> None:
        self.keys = keys
        self.store = SignatureStore(state)

    def check_push(self, name: str, version: str, signature: Any, signer: Any) -> None:
        self.keys.verify(f"{name}.py", version, signature, signer)

    def keep(self, name: str, version: str, signature: str, signer: str) -> None:
        self.store.save(f"{name}.py", version, signature, signer)

    def check_stored(self, name: str, version: str) -> None:
        """The version on disk (a backup to restore, the live file at start) must have come signed."""
        kept = self.store.get(f"{name}.py", version)
        if kept is None:
            raise Unsigned(f"{name}.py at {version[:12]} never came with a signature this agent kept, and it runs "
                           "only signed code; it is not loaded (push a signed version)")
        self.keys.verify(f"{name}.py", version, kept.get("signature"), kept.get("key_id"))

    def describe(self) -> Dict[str, Any]:
        return {"required": True, "trusted_keys": sorted(self.keys.keys)}
