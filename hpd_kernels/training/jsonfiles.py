"""The JSON files of a run directory: each written atomically, and the metrics read back.

A file is written next to its final path and renamed over it once complete and on disk, so a
process killed mid-write leaves the previous version, never half a file: `resume` reads these
files after exactly such interruptions. This module imports nothing of the trainer, so the
checkpoints and the trainer can use it too.
"""

from __future__ import annotations

import json
import os


def _replace_atomically(path, text):
    temporary = path + ".tmp"
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


def read_metrics(path):
    """The records of a `metrics.jsonl`: one dict per optimiser step, in order."""
    with open(path) as handle:
        return [json.loads(line) for line in handle if line.strip()]


def truncate_metrics(path, last_step):
    """Keep the records up to `last_step` (a resumed run replays the steps after its checkpoint)."""
    if not os.path.isfile(path):
        return
    kept = [record for record in read_metrics(path) if record.get("step", 0) <= last_step]
    _replace_atomically(path, "".join(json.dumps(record) + "\n" for record in kept))
