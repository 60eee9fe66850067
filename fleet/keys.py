"""Release-signing keys: Ed25519, made by ``fleet keys init``, used by deploys and ``fleet release create``.

The private key may live on another machine than the controller (a release
manager's laptop, CI); the agents hold only public keys (``--trusted-keys``).
Each handler file is signed for its name and sha256 (``contract.signed_message``),
so one signature serves every release and every device that runs that
version. The key used is ``--sign-key PATH``, else ``$PIFLEET_SIGN_KEY``,
else ``keys/release.key`` beside the state file when it exists; with none,
pushes go unsigned (fine for agents without ``--trusted-keys``).
"""

from __future__ import annotations

import base64
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional, Tuple

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.contract import key_id, signed_message

from .errors import ConfigError

SIGN_KEY_ENV = "PIFLEET_SIGN_KEY"
KEY_NAME = "release.key"


@dataclass(frozen=True)
class SigningKey:
    private: Ed25519PrivateKey
    key_id: str
    path: Path

    def sign(self, filename: str, sha256: str) -> str:
        return base64.b64encode(self.private.sign(signed_message(filename, sha256))).decode("ascii")


def init_key(folder: Path) -> Tuple[Path, Path, str]:
    """Make a key pair in ``folder``: ``release.key`` (mode 0600) and ``release.pub``; the key id."""
    private_path, public_path = folder / KEY_NAME, folder / "release.pub"
    if private_path.exists():
        raise ConfigError(f"{private_path} exists already; it is kept (move it away to make another)")
    folder.mkdir(parents=True, exist_ok=True)
    key = Ed25519PrivateKey.generate()
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption()))
    public = key.public_key()
    public_path.write_bytes(public.public_bytes(serialization.Encoding.PEM,
                                                serialization.PublicFormat.SubjectPublicKeyInfo))
    return private_path, public_path, key_id(public.public_bytes(serialization.Encoding.Raw,
                                                                  serialization.PublicFormat.Raw))


def load_key(path: Path) -> SigningKey:
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except FileNotFoundError:
        raise ConfigError(f"signing key {path} not found (`fleet keys init` makes one)") from None
    except (OSError, ValueError, TypeError) as exc:
        raise ConfigError(f"signing key {path}: cannot use it: {exc}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"signing key {path} is not an Ed25519 key (`fleet keys init` makes one)")
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return SigningKey(key, key_id(raw), Path(path))


def chosen_key(option: Optional[str], state_file: Path, environ: Mapping[str, str]) -> Optional[SigningKey]:
    """``--sign-key``, else ``$PIFLEET_SIGN_KEY``, else ``keys/release.key`` beside the state file if it exists."""
    if option:
        return load_key(Path(option))
    if environ.get(SIGN_KEY_ENV):
        return load_key(Path(environ[SIGN_KEY_ENV]))
    default = default_folder(state_file) / KEY_NAME
    return load_key(default) if default.exists() else None


def default_folder(state_file: Path) -> Path:
    return state_file.parent / "keys"
