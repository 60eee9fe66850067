"""Host many real agents in one process, for benchmarks that need hundreds of devices.

    python bench/agent_host.py --count 250 --base DIR [--ports 4100,4101,...]

Each agent is a full ``agent.app.Agent`` (own root folder, own port on
127.0.0.1, own registry, dispatcher and deploy pipeline) sharing one event
loop. The one difference from a Pi: the agents of one host share a single
import-test helper, because a thousand helper processes would need about 12
GB of memory on one machine; on a fleet each Pi has its own. Prints one JSON
line once every agent listens (its ports, and when each began to listen, as
``time.time()``), then serves until SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
import time
from pathlib import Path
from typing import List, Optional

from agent.app import Agent
from agent.config import AgentConfig


async def serve(count: int, base: Path, wanted: Optional[List[int]] = None) -> None:
    ports_wanted = wanted or [0] * count
    first = Agent(AgentConfig(root=base / "agent0000", port=ports_wanted[0], probation_seconds=60))
    agents = [first] + [Agent(AgentConfig(root=base / f"agent{i:04d}", port=ports_wanted[i], probation_seconds=60),
                              tester=first.tester) for i in range(1, count)]
    ports, listening = [], []
    for agent in agents:
        _, port = await agent.start()
        ports.append(port)
        listening.append(time.time())
    print(json.dumps({"ports": ports, "listening_at": listening}), flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    for agent in agents:
        await agent.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--base", type=Path, required=True)
    parser.add_argument("--ports", default=None, help="comma-separated ports, one per agent (default: any free ones)")
    args = parser.parse_args()
    wanted = [int(p) for p in args.ports.split(",")] if args.ports else None
    if wanted is not None and len(wanted) != args.count:
        parser.error("--ports needs one port per agent")
    asyncio.run(serve(args.count, args.base, wanted))
    return 0


if __name__ == "__main__":
    sys.exit(main())
