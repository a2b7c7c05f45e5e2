"""Runs and warm-ups in parallel worker processes (one CPU thread each), each rebuilding the
shared `Context` from disk, and killed with the parent whose lock they work under."""

from __future__ import annotations

import os

import torch

from ..locks import die_with_parent
from .context import Context
from .runs import execute, warm_student


def in_pool(work, jobs, workers, done):
    """`work(job)` for every job in `workers` processes (one CPU thread each); `done(result)` as
    each finishes."""
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(workers, initializer=_init_worker,
                                                   initargs=(os.getpid(),)) as pool:
        for result in pool.imap_unordered(work, jobs):
            done(result)


def warm_up_in_worker(job):
    experiment, out_dir, cache_dir, seed = job
    context = Context(experiment, cache_dir)
    context.prepare(lambda *_: None)
    warm_student(context, seed, out_dir)
    return seed


def _init_worker(parent_pid):
    """One CPU thread; and killed with the parent, whose lock on the output directory it works under."""
    die_with_parent(parent_pid)
    torch.set_num_threads(1)


def run_in_worker(job):
    """One run in a worker process: data, teacher, its samples and the warm student from disk."""
    experiment, out_dir, cache_dir, run, commit = job
    context = Context(experiment, cache_dir)
    context.prepare(lambda *_: None)
    execute(run, out_dir, context, commit, progress=False)
    return run.name
