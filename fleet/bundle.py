"""The offline agent bundle: ``pi-agent-VERSION.pyz``, one file with the agent and its MQTT client.

Built with the standard library's ``zipapp`` from this checkout's ``agent/``
and the ``paho`` package (pure Python, with its licence) that ``--broker``
uses, so a Pi behind NAT needs nothing from the internet. ``cryptography``
for ``--trusted-keys`` is not pure Python: it comes from the OS
(``python3-cryptography``). Run it as
``python3 pi-agent-VERSION.pyz --root ...``: every option is ``pi-agent``'s.
The import test's helper cannot run from inside a zip, so the agent copies
it out once, under its ``--root`` (``agent/isolation.py``).
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
import zipapp
from pathlib import Path

from agent import __version__

AGENT = Path(__file__).resolve().parent.parent / "agent"
MAIN = '''"""pi-agent, from its offline bundle: python3 pi-agent.pyz --root ... (pi-agent --help)."""
import sys

from agent.cli import main

sys.exit(main())
'''


def build_pyz(out: Path, source: Path = AGENT, version: str = __version__) -> Path:
    """Write ``out/pi-agent-VERSION.pyz`` from the agent package at ``source`` (whole or not at all)."""
    out.mkdir(parents=True, exist_ok=True)
    target = out / f"pi-agent-{version}.pyz"
    with tempfile.TemporaryDirectory(prefix="pi-agent-bundle-") as tmp:
        staging = Path(tmp) / "app"
        shutil.copytree(source, staging / "agent", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        _add_paho(staging)
        (staging / "__main__.py").write_text(MAIN)
        partial = Path(tmp) / target.name
        zipapp.create_archive(staging, partial, interpreter="/usr/bin/env python3", compressed=True)
        shutil.move(str(partial), target)
    return target


def _add_paho(staging: Path) -> None:
    """The MQTT client the agent's ``--broker`` uses (paho-mqtt, a dependency of the controller's aiomqtt)."""
    import paho.mqtt

    package = Path(paho.mqtt.__file__).resolve().parent.parent  # .../site-packages/paho
    shutil.copytree(package, staging / "paho", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for licence in package.parent.glob("paho_mqtt-*.dist-info/licenses/*"):
        shutil.copy(licence, staging / "paho" / f"{licence.name}.paho-mqtt")


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 16), b""):
            digest.update(block)
    return digest.hexdigest()
