"""What a rollout puts on a device: a set of handler files, and the release they make.

A rollout of one file is a set of one. A release from the state store is a
set of its files, read back from their stored contents; a device is current
when every file of the set runs there at exactly that version. Handler files
the set does not name are not the rollout's business and are left alone.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterable, Optional, Tuple

from agent.contract import handler_name

from .errors import ConfigError


@dataclass(frozen=True)
class HandlerFile:
    name: str  # e.g. camera_handlers.py
    code: str
    sha256: str
    signature: Optional[str] = None  # base64 Ed25519 over the name and sha256 (``fleet/keys.py``)
    key_id: Optional[str] = None  # the key that signed it

    @classmethod
    def of(cls, name: str, code: str) -> "HandlerFile":
        return cls(name, code, hashlib.sha256(code.encode("utf-8")).hexdigest())


@dataclass(frozen=True)
class FileSet:
    """Handler files by name (sorted), and the release number they make (None for files outside the store)."""

    files: Tuple[HandlerFile, ...]
    release: Optional[int] = None

    @classmethod
    def of(cls, files: Iterable[HandlerFile], release: Optional[int] = None) -> "FileSet":
        by_name = {f.name: f for f in files}
        if not by_name:
            raise ConfigError("nothing to roll out: no handler files given")
        return cls(tuple(by_name[name] for name in sorted(by_name)), release)

    @classmethod
    def from_release(cls, number: int, files: Dict[str, str], content: Callable[[str], bytes],
                     signature: Callable[[str, str], Optional[Tuple[str, str]]] = lambda name, sha: None) -> "FileSet":
        """The files of release ``number`` (name -> sha256), with contents from ``content(sha256)`` and
        signatures from ``signature(name, sha256)`` -> ``(key_id, signature)``."""
        def handler_file(name: str, sha: str) -> HandlerFile:
            signed = signature(name, sha)
            return HandlerFile(name, content(sha).decode("utf-8"), sha, signed[1] if signed else None,
                               signed[0] if signed else None)

        return cls.of((handler_file(name, sha) for name, sha in files.items()), number)

    @property
    def names(self) -> Tuple[str, ...]:
        return tuple(f.name for f in self.files)

    def versions(self) -> Dict[str, str]:
        return {f.name: f.sha256 for f in self.files}

    def describe(self) -> str:
        """``greet.py (release 4)``, or ``greet.py`` outside the store: what a rollout line says it rolls out."""
        names = ", ".join(self.names)
        return f"{names} (release {self.release})" if self.release else names


def read_handler(path: Path) -> Tuple[str, str]:
    """``(filename, code)`` of a handler file, its name checked by the agent's own rule before anything is sent."""
    name, why = handler_name(path.name)
    if name is None:
        raise ConfigError(f"{path}: {why}")
    try:
        return path.name, path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read: {exc}") from None


def read_handlers(paths: Iterable[Path]) -> Tuple[HandlerFile, ...]:
    """The handler files at ``paths``; two paths with one file name are refused (a device has one of each)."""
    files: Dict[str, HandlerFile] = {}
    for path in paths:
        name, code = read_handler(Path(path))
        if name in files:
            raise ConfigError(f"{path}: two files named {name} given; a device runs one file of each name")
        files[name] = HandlerFile.of(name, code)
    return tuple(files.values())
