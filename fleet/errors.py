"""Errors of the fleet controller.

Keep *the device said no* apart from *we could not reach it*: the first is a
reply (``success: false`` with the agent's ``code``), never an exception; the
second is about the network (``DeviceUnreachable``, ``CommandTimeout``).
Fan-out never raises these for a single device; it turns them into
per-device results.

    FleetError
    +-- ConfigError          a bad devices.json or option (CLI exit code 2)
    +-- UnknownDevice        a device id that is not in the inventory
    +-- DeviceError          something about one device
        +-- DeviceUnreachable    could not connect, or the connection dropped
        |   +-- ConnectionLost       it dropped with our request unanswered: it may have run
        +-- CommandTimeout       no reply within the time limit
        +-- ProtocolError        the device answered something that is not our protocol
        +-- TLSRefused           the TLS handshake failed: a certificate was refused (nothing ran)
        +-- WrongDevice          over TLS, the agent's certificate names another device (nothing sent)
"""

from __future__ import annotations

from agent import contract


class FleetError(Exception):
    code = "fleet_error"


class ConfigError(FleetError):
    code = "config_error"


class UnknownDevice(FleetError):
    code = "unknown_device"


class DeviceError(FleetError):
    def __init__(self, device_id: str, message: str) -> None:
        super().__init__(f"{device_id}: {message}")
        self.device_id = device_id
        self.message = message


class DeviceUnreachable(DeviceError):
    code = contract.UNREACHABLE


class ConnectionLost(DeviceUnreachable):
    """The connection dropped while a request waited for its reply: the device may or may not have run it."""

    code = contract.CONNECTION_LOST


class CommandTimeout(DeviceError):
    code = contract.TIMEOUT


class ProtocolError(DeviceError):
    code = contract.PROTOCOL_ERROR


class TLSRefused(DeviceError):
    """The TLS handshake failed (either side refused a certificate): nothing was sent, nothing ran."""

    code = contract.TLS_FAILED


class WrongDevice(DeviceError):
    """Over TLS, the agent's certificate names another device: nothing was sent to it."""

    code = contract.WRONG_DEVICE
