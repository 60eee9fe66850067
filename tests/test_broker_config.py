"""The broker's configuration: what `fleet broker config` writes, and the example in deploy/mosquitto/."""

from pathlib import Path

from conftest import REPO
from fleet.broker_config import BrokerFiles, acl_text, mosquitto_conf

ETC = Path("/etc/mosquitto/pifleet")


def test_the_example_in_deploy_is_what_the_generator_writes_for_those_paths():
    files = BrokerFiles(ETC / "broker.crt", ETC / "broker.key", ETC / "ca.crt", ETC / "crl.pem")
    example = REPO / "deploy" / "mosquitto"
    assert (example / "mosquitto.conf").read_text() == mosquitto_conf(files, ETC, persistence=Path("/var/lib/mosquitto"))
    assert (example / "acl").read_text() == acl_text(["laptop", "converge"])


def test_devices_get_their_own_tree_and_controllers_everything():
    acl = acl_text(["ci"]).splitlines()
    device_rules = [line for line in acl if line.startswith("pattern ")]
    assert all("%u" in line or "/blobs/" in line for line in device_rules)
    assert not any(line.startswith("pattern readwrite") or line.endswith("pifleet/#") for line in device_rules)
    assert acl[acl.index("user ci") + 1] == "topic readwrite pifleet/#"
