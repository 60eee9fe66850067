"""Many simulated devices behind a broker, in one process, for ``broker_scale.py``.

    python bench/broker_devices.py --port 1883 --first 0 --count 2500

Each device is a real MQTT connection (aiomqtt, MQTT 5) that behaves like an
agent on the wire: a retained last will and birth message, requests on
``pifleet/ID/req`` answered on the topic they name (``ping`` with a pong,
anything else with ``unknown_command``), and a desired release applied by
reporting it, retained, at ``pifleet/ID/reported``. It runs no handler code:
this measures the broker and the controller, not the Pis. Prints one JSON line
once every device is online (how long that took), then serves until SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
import time
from pathlib import Path
from typing import Any

import aiomqtt

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agent import contract  # noqa: E402

CONNECTS_AT_ONCE = 100  # connections opening at a time (each opens in a thread: paho's connect blocks)


def reply_to(request: dict) -> bytes:
    base = {"id": request.get("id"), "timestamp": time.time()}
    if request.get("command") == "ping":
        return json.dumps({**base, "type": "pong", "message": "pong", "success": True}).encode()
    return json.dumps({**base, "success": False, "code": contract.UNKNOWN_COMMAND,
                       "error": f"unknown command {request.get('command')!r} (a simulated device)"}).encode()


async def device(device_id: str, port: int, gate: asyncio.Semaphore, online: asyncio.Event,
                 stop: asyncio.Event) -> None:
    status = contract.device_topic(device_id, contract.STATUS_TOPIC)
    will = aiomqtt.Will(status, json.dumps({"online": False, "device_id": device_id}), qos=1, retain=True)
    client = aiomqtt.Client("127.0.0.1", port, identifier=f"pifleet-device-{device_id}", will=will,
                            protocol=aiomqtt.ProtocolVersion.V5, keepalive=60, timeout=60)
    reported = contract.device_topic(device_id, contract.REPORTED_TOPIC)

    def on_request(paho: Any, _userdata: Any, message: Any) -> None:
        request = json.loads(message.payload)
        if isinstance(request.get("reply_to"), str):
            paho.publish(request["reply_to"], reply_to(request), qos=1)

    def on_desired(paho: Any, _userdata: Any, message: Any) -> None:
        desired = json.loads(message.payload)
        files = {name: spec["sha256"] for name, spec in desired.get("files", {}).items()}
        report = {"release": desired.get("release"), "files": files, "state": "current", "at": time.time()}
        paho.publish(reported, json.dumps(report), qos=1, retain=True)

    async with gate:
        await client.__aenter__()
        # paho's callbacks, on this thread (aiomqtt drives paho from the event loop): each message costs a
        # simulated device as little as it can, so that the bench measures the broker and the controller.
        client._client.message_callback_add(contract.device_topic(device_id, contract.REQUEST_TOPIC), on_request)
        client._client.message_callback_add(contract.device_topic(device_id, contract.DESIRED_TOPIC), on_desired)
        await client.subscribe([(contract.device_topic(device_id, contract.REQUEST_TOPIC), 1),
                                (contract.device_topic(device_id, contract.DESIRED_TOPIC), 1)])
        await client.publish(status, json.dumps({"online": True, "device_id": device_id, "agent_version": "sim",
                                                 "started_at": time.time()}), qos=1, retain=True)
    online.set()
    await stop.wait()


async def serve(port: int, first: int, count: int) -> None:
    gate = asyncio.Semaphore(CONNECTS_AT_ONCE)
    started = time.perf_counter()
    flags = [asyncio.Event() for _ in range(count)]
    stop = asyncio.Event()
    tasks = [asyncio.ensure_future(device(f"sim{first + n:05d}", port, gate, flags[n], stop)) for n in range(count)]
    for flag in flags:
        await flag.wait()
    print(json.dumps({"online": count, "seconds": time.perf_counter() - started}), flush=True)
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    for task in tasks:
        task.cancel()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, required=True, help="the broker's plain MQTT port on 127.0.0.1")
    parser.add_argument("--first", type=int, default=0, help="number of the first device (sim00000, ...)")
    parser.add_argument("--count", type=int, required=True, help="how many devices")
    args = parser.parse_args()
    asyncio.run(serve(args.port, args.first, args.count))
    return 0


if __name__ == "__main__":
    sys.exit(main())
