"""The JSON files of a run directory: each written atomically, and the metrics read back.

A file is written next to its final path and renamed over it once complete and on disk, so a
process killed mid-write leaves the previous version, never half a file: `resume` reads these
files after exactly such interruptions. A write that the system refuses (a full disk, a
read-only or vanished directory) is a `WriteError` naming the file, never a traceback from deep
inside the trainer. This module imports nothing of the trainer, so the checkpoints and the
trainer can use it too.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os


class WriteError(OSError):
    """A file of a run could not be written (a full disk, say): the message names the file and
    the system's reason in one line."""


@contextlib.contextmanager
def writing(path):
    """Turn an `OSError` raised while writing `path` into a one-line `WriteError` naming it."""
    try:
        yield
    except WriteError:
        raise
    except OSError as error:
        reason = error.strerror or str(error) or type(error).__name__
        if error.errno in (errno.ENOSPC, errno.EDQUOT):
            reason += " (free some space and run the same command again: it resumes from the last checkpoint)"
        converted = WriteError(f"cannot write {path}: {reason}")
        converted.errno = error.errno
        raise converted from error


def _replace_atomically(path, text):
    temporary = path + ".tmp"
    with writing(path):
        try:
            with open(temporary, "w") as handle:
                handle.write(text)
                handle.flush()
                os.fsync(handle.fileno())
        except BaseException:
            if os.path.exists(temporary):
                os.remove(temporary)
            raise
        os.replace(temporary, path)


def write_json_atomic(path, value, indent=1):
    """`value` as JSON at `path`, replacing any previous file atomically."""
    _replace_atomically(path, json.dumps(value, indent=indent))


def write_text_atomic(path, text):
    """`text` at `path`, replacing any previous file atomically."""
    _replace_atomically(path, text)


def read_metrics(path):
    """The records of a `metrics.jsonl`: one dict per optimiser step, in order. A last line cut
    short by a kill mid-write (no newline, not valid JSON) is not a record; any other line that is
    not JSON is a `ValueError` naming the file and line."""
    with open(path) as handle:
        lines = handle.read().split("\n")
    records = []
    for number, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as error:
            if number == len(lines) - 1:  # the unterminated tail of an interrupted write
                break
            raise ValueError(f"{path} line {number + 1}: not valid JSON ({error.msg}): the file was damaged or "
                             f"edited") from None
    return records


def truncate_metrics(path, last_step):
    """Keep the records up to `last_step`: a resumed run replays the steps after its checkpoint,
    and a run without a checkpoint (`last_step` 0) starts its metrics from empty."""
    if not os.path.isfile(path):
        return
    kept = [record for record in read_metrics(path) if record.get("step", 0) <= last_step]
    _replace_atomically(path, "".join(json.dumps(record) + "\n" for record in kept))
