"""Peak memory and time of one (variant, objective, tokens) step, on CUDA or on the CPU.

CUDA: in this process. Peak = `torch.cuda.max_memory_allocated()` over the timed repeats minus
the bytes allocated before them (the inputs), so it is what the step itself needs, gradient
included. Time = median of the repeats, each between two `torch.cuda.synchronize()`.

CPU: every measurement runs in a fresh process, because a process's peak resident set size only
ever grows and its allocator keeps freed memory: what one variant leaves behind must not be
charged to, or hide the needs of, the next. The processes are forked from a server that has
already imported torch (multiprocessing's forkserver), which saves the ~2.5 s import per
measurement without sharing any state. Peak = the process's peak RSS (VmHWM, what `ru_maxrss`
reports) minus its RSS once the inputs exist; the high-water mark is reset to the current RSS at
that point (`/proc/self/clear_refs`), so the temporaries that made the inputs do not count.
For `torch.compile` the baseline and reset come after the warm-up calls instead, so the
compiler's own memory is not charged to the compiled code; before either, `malloc_trim` hands
the memory that malloc keeps after a free back to the system, so that memory freed by the
warm-up cannot sit in the baseline and silently serve the timed calls.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import math
import multiprocessing
import os
import resource
import statistics
import time
import traceback
from dataclasses import asdict, dataclass

import torch

CHILD_TIMEOUT_S = 900
# Timed calls last at least this long in all (more repeats for short calls): on the CPU a median of
# a few short calls is noise, and so is the load check (/proc/stat counts 10 ms ticks). A GPU's
# timings are steadier, and its benchmark has to fit a few minutes.
MIN_TIMED_SECONDS = {"cpu": 1.0, "cuda": 0.25}
MAX_REPEATS = 50
# Other processes busy on more cores than this during a CPU measurement make its time untrustworthy.
CONTENDED_CORES = 0.25


@dataclass(frozen=True)
class Job:
    variant: str
    objective: str
    tokens: int
    vocab: int
    student_hidden: int
    teacher_hidden: int
    dtype: str        # torch dtype name, e.g. "float32" (picklable across processes)
    device: str
    warmup: int
    repeats: int
    prompt_fraction: float


def _short_error(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"[:300]


# ----------------------------------------------------------------------------------------------
# Resident memory of this process (Linux).
# ----------------------------------------------------------------------------------------------

def rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def release_free_memory() -> None:
    """Return malloc's cached free memory to the system (glibc); a no-op elsewhere."""
    gc.collect()
    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class OtherProcessesLoad:
    """CPU time that *other* processes used while we measured, in cores (0 = the machine was ours).

    A timing on a shared 2-core machine means nothing if something else ran meanwhile; this is how
    such a measurement is recognised (and retried by the caller). From /proc/stat's busy time of
    all CPUs minus this process's own user + system time.
    """

    def __init__(self):
        self.ticks_per_second = os.sysconf("SC_CLK_TCK")
        self.start = self._sample()

    def _sample(self):
        try:
            with open("/proc/stat") as handle:
                user, nice, system, idle, iowait, irq, softirq, steal = map(int, handle.readline().split()[1:9])
        except (OSError, ValueError):
            return None
        own = os.times()
        busy_seconds = (user + nice + system + irq + softirq + steal) / self.ticks_per_second
        return time.perf_counter(), busy_seconds, own.user + own.system

    def cores(self):
        end = self._sample()
        if self.start is None or end is None:
            return None
        wall = end[0] - self.start[0]
        others = (end[1] - self.start[1]) - (end[2] - self.start[2])
        return max(0.0, others / wall) if wall > 0 else 0.0


def wait_for_quiet_cpu(max_wait_seconds: float, threshold_cores: float, window_seconds: float = 0.5) -> float:
    """Wait (at most `max_wait_seconds`) until other processes use under `threshold_cores`;
    returns the load seen last. Called by an idle parent, so all the load it sees is someone else's."""
    deadline = time.perf_counter() + max_wait_seconds
    while True:
        meter = OtherProcessesLoad()
        time.sleep(window_seconds)
        load = meter.cores()
        if load is None or load < threshold_cores or time.perf_counter() >= deadline:
            return load or 0.0


def reset_peak_rss() -> bool:
    """Lower the high-water mark to the current RSS (Linux >= 4.0); False where not permitted."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


# ----------------------------------------------------------------------------------------------
# One measurement.
# ----------------------------------------------------------------------------------------------

def _setup(job: Job):
    from bench import workloads

    shape = workloads.Shape(job.tokens, job.vocab, job.student_hidden, job.teacher_hidden,
                            getattr(torch, job.dtype), job.device, job.prompt_fraction)
    inputs = workloads.make_inputs(workloads.VARIANTS[job.variant].level, shape)
    return inputs, workloads.build_step(job.variant, job.objective, inputs)


def _repeats(job: Job, last_warmup_seconds: float) -> int:
    """At least `job.repeats` timed calls, and enough for about MIN_TIMED_SECONDS of them."""
    if last_warmup_seconds <= 0:
        return job.repeats
    wanted = math.ceil(MIN_TIMED_SECONDS[job.device] / last_warmup_seconds)
    return max(job.repeats, min(MAX_REPEATS, wanted))


def _warm_up(step, count, synchronize):
    """`(first call's seconds, last call's seconds, all of them)` of `count` untimed calls."""
    first = seconds = total = 0.0
    for index in range(count):
        synchronize()
        start = time.perf_counter()
        step()
        synchronize()
        seconds = time.perf_counter() - start
        total += seconds
        first = seconds if index == 0 else first
    return first, seconds, total


def through_eager_phase(step, limit=1000):
    """`(calls, seconds)`: the calls it takes the library's torch backend to leave its eager phase
    (`torch_backend.eager_phase_over`) and make the call that compiles, so that the timed calls
    measure the steady state; none where it runs on Triton or its problems are too small to compile."""
    from hpd_kernels.ops import torch_backend

    calls, seconds = 0, 0.0
    while calls < limit:
        if torch_backend.eager_phase_over():
            limit = calls + 1  # one call more: the one that compiles
        before = torch_backend.eager_elements()
        start = time.perf_counter()
        step()
        seconds += time.perf_counter() - start
        calls += 1
        if not torch_backend.eager_phase_over() and torch_backend.eager_elements() == before:
            break  # below the compile size: it stays eager
    return calls, seconds


def _timed(step, repeats, synchronize):
    times, loss = [], None
    for _ in range(repeats):
        synchronize()
        start = time.perf_counter()
        loss = step()
        synchronize()
        times.append(time.perf_counter() - start)
    return times, loss


def measure_cpu_here(job: Job) -> dict:
    """Measure in the calling process, which must be fresh (see the module docstring)."""
    from bench import workloads

    torch.manual_seed(0)
    # torch.compile, and hpd_kernels (whose torch backend compiles its chunk math on first use): the
    # peak is taken after the warm-up, so that compiling is not counted (its time is: first call).
    compiled = job.variant in (workloads.COMPILED, "hpd_kernels", "hpd_kernels fused-linear")
    inputs, step = _setup(job)
    release_free_memory()
    baseline = rss_bytes()
    peak_was_reset = reset_peak_rss()
    try:
        first_call_seconds, last_warmup_seconds, warmup_seconds = _warm_up(step, job.warmup, lambda: None)
    except Exception as error:  # e.g. torch.compile without a working C++ toolchain
        return {"error": _short_error(error), "traceback": traceback.format_exc(limit=4)}
    library = job.variant in ("hpd_kernels", "hpd_kernels fused-linear")
    eager_calls, eager_seconds = through_eager_phase(step) if library else (0, 0.0)
    if compiled:
        release_free_memory()
        baseline = rss_bytes()
        peak_was_reset = reset_peak_rss()
    other_load = OtherProcessesLoad()
    times, loss = _timed(step, _repeats(job, last_warmup_seconds), lambda: None)
    peak = peak_rss_bytes() - baseline
    del inputs, step
    return {"peak_bytes": peak, "seconds": statistics.median(times), "times": times, "loss": float(loss),
            "first_call_seconds": first_call_seconds, "peak_reset": peak_was_reset,
            "untimed_calls": job.warmup + eager_calls,
            "untimed_seconds": warmup_seconds + eager_seconds,
            "other_cpu_load": other_load.cores()}


def measure_cuda(job: Job) -> dict:
    """Measure in this process on the current CUDA device; out-of-memory is a result, not a crash."""
    inputs = step = None
    try:
        torch.manual_seed(0)
        inputs, step = _setup(job)
        _, last_warmup_seconds, _ = _warm_up(step, job.warmup, torch.cuda.synchronize)
        gc.collect()
        baseline = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        times, loss = _timed(step, _repeats(job, last_warmup_seconds), torch.cuda.synchronize)
        peak = torch.cuda.max_memory_allocated() - baseline
        return {"peak_bytes": peak, "seconds": statistics.median(times), "times": times, "loss": float(loss)}
    except torch.cuda.OutOfMemoryError as error:
        return {"error": "out of memory: " + _short_error(error)[:200]}
    except Exception as error:
        return {"error": _short_error(error), "traceback": traceback.format_exc(limit=4)}
    finally:
        del inputs, step
        gc.collect()
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------
# Fresh CPU processes from a forkserver.
# ----------------------------------------------------------------------------------------------

def resolve_device(name: str) -> str:
    """`--device`: "auto" is cuda where torch sees it, else cpu; "cuda" without a device is an error."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible to torch")
    return name


def _child_main(job_fields: dict, connection):
    try:
        result = measure_cpu_here(Job(**job_fields))
    except BaseException as error:  # report anything rather than die silently
        result = {"error": _short_error(error), "traceback": traceback.format_exc(limit=4)}
    connection.send(result)
    connection.close()


class FreshProcessRunner:
    """Runs each CPU job in a new process forked from a server that has imported torch already."""

    def __init__(self):
        self.context = multiprocessing.get_context("forkserver")
        self.context.set_forkserver_preload(["torch", "hpd_kernels", "hpd_kernels.reference", "bench.workloads",
                                             "bench.measure"])

    def run(self, job: Job) -> dict:
        return self.run_child(_child_main, asdict(job))

    def run_child(self, target, *args) -> dict:
        """`target(*args, connection)` in a fresh process: what it sends, or an error where it sent nothing."""
        receiver, sender = self.context.Pipe(duplex=False)
        process = self.context.Process(target=target, args=(*args, sender))
        process.start()
        sender.close()
        result = None
        if receiver.poll(CHILD_TIMEOUT_S):
            try:
                result = receiver.recv()
            except EOFError:
                result = None
        process.join(timeout=30)
        if process.is_alive():
            process.kill()
            process.join()
        if result is None:
            result = {"error": f"measurement process ended without a result (exit code {process.exitcode}; "
                               "killed for memory or over the time limit?)"}
        return result
