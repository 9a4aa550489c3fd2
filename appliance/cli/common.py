"""What both command-line tools share: error reporting and progress lines."""

from __future__ import annotations

import argparse
import sys
import time
import traceback
from collections.abc import Callable

from appliance.errors import ApplianceError


def run(main: Callable[[argparse.Namespace], int], parser: argparse.ArgumentParser,
        argv: list[str] | None) -> int:
    """Parse, run, and turn every ApplianceError into `error:`/`hint:` lines and its exit code."""
    args = parser.parse_args(argv)
    try:
        return main(args)
    except ApplianceError as exc:
        if args.debug:
            traceback.print_exc()
        print(f"error: {exc.message}", file=sys.stderr)
        if exc.hint:
            print(f"hint: {exc.hint}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class Progress:
    """Byte progress on stderr: a live line on a terminal, a line per quarter otherwise."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.tty = sys.stderr.isatty()
        self.last = -1
        self.started = time.monotonic()

    def __call__(self, done: int, total: int) -> None:
        pct = done * 100 // max(total, 1)
        step = pct if self.tty else pct // 25 * 25
        if step == self.last:
            return
        self.last = step
        rate = done / max(time.monotonic() - self.started, 1e-6) / (1 << 20)
        line = f"{self.label}: {pct:3d}% of {total >> 20} MiB ({rate:.0f} MiB/s)"
        if self.tty:
            print(f"\r{line}", end="\n" if done >= total else "", file=sys.stderr, flush=True)
        else:
            print(line, file=sys.stderr, flush=True)
