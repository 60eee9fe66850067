"""A real Mosquitto for the tests: the configuration ``fleet broker config`` writes, on free loopback ports.

The broker's identities come from a fleet CA made for it: devices ``m0``..``m9``,
a controller ``laptop``, and the broker's own certificate for 127.0.0.1.
"""

from __future__ import annotations

import getpass
import shutil
import socket
import subprocess
import threading
from pathlib import Path
from typing import Dict, List, Optional

from fleet.broker_config import BrokerFiles, write_config
from fleet.ca import FleetCA, Issued

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"  # root's PATH has sbin; others' may not
MISSING = "mosquitto is not installed (apt-get install mosquitto; .ci/run installs it)"
READY_MARK = " running"  # "mosquitto version 2.0.11 running"
START_TIMEOUT = 20.0


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class BrokerPKI:
    """The fleet CA behind a test broker, and the certificates of everyone who talks to it."""

    def __init__(self, folder: Path) -> None:
        self.ca = FleetCA(folder / "ca")
        self.ca.init()
        self.broker = self.ca.issue("127.0.0.1", folder / "broker", kind="broker", hosts=["127.0.0.1", "localhost"])
        self.devices: Dict[str, Issued] = {f"m{n}": self.ca.issue(f"m{n}", folder / f"m{n}") for n in range(10)}
        self.controller = self.ca.issue("laptop", folder / "laptop", kind="controller")


class Mosquitto:
    """One broker process: ``start()``, ``stop()``, ``restart()`` (retained messages survive: persistence)."""

    def __init__(self, conf: Path, tls_port: int, plain_port: Optional[int], pki: Optional[BrokerPKI] = None) -> None:
        self.conf = conf
        self.tls_port = tls_port
        self.plain_port = plain_port
        self.pki = pki
        self.proc: Optional[subprocess.Popen] = None
        self.log: List[str] = []

    @classmethod
    def for_pki(cls, folder: Path, pki: BrokerPKI) -> "Mosquitto":
        """A broker with the configuration ``fleet broker config`` writes for ``pki``, on free ports."""
        tls_port, plain_port = free_port(), free_port()
        files = BrokerFiles(pki.broker.cert, pki.broker.key, pki.broker.ca, pki.ca.crl_path)
        conf, *_ = write_config(pki.ca, files, folder, host="127.0.0.1", port=tls_port, plain_port=plain_port,
                               run_as=getpass.getuser())
        return cls(conf, tls_port, plain_port, pki)

    @property
    def plain_url(self) -> str:
        return f"mqtt://127.0.0.1:{self.plain_port}"

    @property
    def tls_url(self) -> str:
        return f"mqtts://127.0.0.1:{self.tls_port}"

    def start(self) -> None:
        self.proc = subprocess.Popen([MOSQUITTO, "-c", str(self.conf)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True)
        assert self.proc.stderr is not None
        ready = threading.Event()
        self._drainer = threading.Thread(target=self._drain, args=(self.proc.stderr, ready), daemon=True)
        self._drainer.start()
        if not ready.wait(START_TIMEOUT) or self.proc.poll() is not None:
            self.stop()
            raise RuntimeError("mosquitto did not start:\n" + "\n".join(self.log[-20:]))

    def _drain(self, stream, ready: threading.Event) -> None:
        """Keep the log (for a failing test's message) and say when the broker runs."""
        for line in stream:
            self.log.append(line.rstrip())
            if READY_MARK in line:
                ready.set()
        ready.set()  # it exited: start() sees that

    def stop(self) -> None:
        """SIGTERM: the broker saves its retained messages and exits."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        if self.proc is not None:
            self._drainer.join(10)  # it ends at the pipe's end, now that the broker has exited
            assert self.proc.stderr is not None
            self.proc.stderr.close()
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()


def have_mosquitto() -> bool:
    return Path(MOSQUITTO).exists()
