"""Ordinary handlers: one plain, one async, and one from COMMAND_HANDLERS."""
import asyncio


def handle_echo(data):
    return {"echo": {k: v for k, v in data.items() if k not in ("command", "id")}}


async def handle_async_echo(data):
    await asyncio.sleep(0)
    return {"echo": data.get("value"), "async": True}


def add(data):
    return {"sum": data.get("a", 0) + data.get("b", 0)}


def handle_fails_politely(data):
    return {"success": False, "error": "no camera attached"}


COMMAND_HANDLERS = {"Add": add}
