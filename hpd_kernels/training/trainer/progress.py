"""A run's progress on the terminal."""

from __future__ import annotations

import sys
import time


class Progress:
    """A one-line progress bar on a terminal; a line every tenth of the run otherwise."""

    def __init__(self, total, label, stream=None):
        self.total, self.label = total, label
        self.stream = stream if stream is not None else sys.stderr
        self.interactive = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.started = time.perf_counter()

    def update(self, step, text):
        elapsed = time.perf_counter() - self.started
        if self.interactive:
            filled = int(30 * step / self.total)
            self.stream.write(f"\r{self.label} [{'#' * filled}{'.' * (30 - filled)}] {step}/{self.total} "
                              f"{text} {elapsed:5.0f}s")
            if step == self.total:
                self.stream.write("\n")
            self.stream.flush()
        elif step == self.total or step % max(1, self.total // 10) == 0:
            self.stream.write(f"{self.label} {step}/{self.total} {text} {elapsed:.0f}s\n")
            self.stream.flush()
