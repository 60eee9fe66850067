"""pi-agent: the program that runs on every Raspberry Pi of a fleet.

It is a small asyncio TCP server speaking newline-delimited JSON. Commands come
from the agent's own built-ins and from hot-loaded *handler modules* in
``<root>/handlers/``; new handler code arrives over the wire and goes through
the deploy pipeline (checks, isolated import test, backup, atomic write, load,
swap) before it is live.

Standard library only, Python 3.9 or newer, so that a Pi with no internet can
run it from a copied folder.
"""

__version__ = "0.1.0"
