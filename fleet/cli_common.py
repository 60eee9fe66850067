"""What every ``fleet`` subcommand shares: exit codes, the printer, and ``KEY=VALUE`` arguments."""

from __future__ import annotations

import json
import shlex
import sys
from typing import Any, Callable, Dict, Optional, Sequence

from . import tables
from .errors import ConfigError
from .results import DeviceResult

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def parse_pairs(pairs: Sequence[str]) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"argument {pair!r} must be KEY=VALUE, e.g. duration=30")
        out[key] = parse_value(value)
    return out


def verify_options(text: Optional[str]) -> Dict[str, Any]:
    """``--verify 'greet name=x'``: the command and its arguments, the same syntax as ``fleet send``."""
    if not text:
        return {"verify": None}
    try:
        words = shlex.split(text)
    except ValueError as exc:
        raise ConfigError(f"--verify {text!r}: {exc}") from None
    if not words:
        raise ConfigError("--verify needs a command, e.g. --verify camera_status")
    return {"verify": words[0], "verify_args": parse_pairs(words[1:])}


def exit_code(results: Sequence[DeviceResult]) -> int:
    return EXIT_OK if all(r.ok for r in results) else EXIT_FAILED


def say(text: str) -> None:
    """A progress or summary line on stderr (stdout is for the table or the JSON document)."""
    print(text, file=sys.stderr, flush=True)


class Output:
    """Where results go: progress to stderr as they arrive, then tables or one JSON document."""

    def __init__(self, as_json: bool) -> None:
        self.as_json = as_json
        self.done = 0

    def progress(self, total: int) -> Callable[[DeviceResult], None]:
        self.done = 0

        def report(result: DeviceResult) -> None:
            self.done += 1
            say(tables.progress_line(result, self.done, total))

        return report

    def emit(self, document: Any, text: str) -> None:
        if self.as_json:
            json.dump(document, sys.stdout, indent=2, default=str)
            sys.stdout.write("\n")
        else:
            print(text)
