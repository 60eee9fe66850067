"""Handlers that misbehave in every way a handler can."""
import sys


def handle_boom(data):
    raise ValueError("the sensor is on fire")


def handle_exit(data):
    sys.exit(3)


async def handle_async_exit(data):
    sys.exit(4)


async def handle_async_boom(data):
    raise KeyError("missing")


def handle_not_dict(data):
    return ["a", "list"]


def handle_not_json(data):
    return {"value": object()}


def handle_nan(data):
    return {"value": float("nan")}


def handle_keyboard(data):
    raise KeyboardInterrupt()
