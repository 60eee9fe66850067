"""Handlers that block until the test releases them (bounded, so nothing outlives the test run)."""
import asyncio
import threading

RELEASE = threading.Event()
ENTERED = threading.Semaphore(0)
LIMIT = 60.0


def handle_block(data):
    ENTERED.release()
    released = RELEASE.wait(LIMIT)
    return {"released": released}


def handle_release(data):
    RELEASE.set()
    return {"released": True}


def handle_reset(data):
    RELEASE.clear()
    return {}


async def handle_async_block(data):
    await asyncio.get_running_loop().run_in_executor(None, RELEASE.wait, LIMIT)
    return {"released": True}


async def handle_async_forever(data):
    await asyncio.Event().wait()
