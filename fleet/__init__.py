"""pifleet controller: roll handler code out to many pi-agents and look after it.

    from fleet import Fleet, RolloutPlan, deploy, load_inventory

    inventory = load_inventory("devices.json")
    async with Fleet.from_inventory(inventory) as fleet:
        report = await deploy(fleet, "handlers/camera_handlers.py", plan=RolloutPlan(verify="camera_status"))
"""

from .errors import (CommandTimeout, ConfigError, ConnectionLost, DeviceUnreachable, FleetError, ProtocolError,
                     UnknownDevice)
from .fleet import Fleet
from .inventory import Device, Inventory, load_inventory, parse_inventory
from .results import DeviceResult, Status
from .rollout import Amount, RolloutPlan, RolloutReport, deploy

__all__ = [
    "Amount", "CommandTimeout", "ConfigError", "ConnectionLost", "Device", "DeviceResult", "DeviceUnreachable", "Fleet",
    "FleetError", "Inventory", "ProtocolError", "RolloutPlan", "RolloutReport", "Status", "UnknownDevice",
    "deploy", "load_inventory", "parse_inventory",
]
