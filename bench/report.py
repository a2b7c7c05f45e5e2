"""The benchmark's outputs: machine description, markdown table, JSON record and PNG plot."""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import subprocess

import torch

from bench.measure import CONTENDED_CORES
from bench.workloads import PROMPT_FRACTION, VARIANTS

MIB = 2.0**20
PLOT_OBJECTIVES = ("hpd", "jsd")


# ----------------------------------------------------------------------------------------------
# The machine.
# ----------------------------------------------------------------------------------------------

def _version(package):
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cpu_model():
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_gib():
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def _git_commit():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                                timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (commit + ("+uncommitted changes" if dirty else "")) or None


def describe_machine(device: str) -> dict:
    machine = {
        "cpu": _cpu_model(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory_gib": _memory_gib(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "liger_kernel": _version("liger-kernel") or _version("liger_kernel"),
        "hpd_kernels_commit": _git_commit(),
    }
    if device == "cuda":
        properties = torch.cuda.get_device_properties(0)
        machine.update(gpu=properties.name, gpu_memory_gib=round(properties.total_memory / 2**30, 1),
                       gpu_capability=f"sm_{properties.major}{properties.minor}", cuda=torch.version.cuda)
    return machine


def machine_line(machine: dict) -> str:
    where = (f"{machine['gpu']} ({machine['gpu_memory_gib']} GiB, CUDA {machine['cuda']}), host "
             if "gpu" in machine else "")
    return (f"{where}{machine['cpu']}, {machine['cpu_cores']} cores ({machine['torch_threads']} torch threads), "
            f"{machine['memory_gib']} GiB RAM; torch {machine['torch']}, triton {machine['triton']}"
            + (f", liger_kernel {machine['liger_kernel']}" if machine.get("liger_kernel") else ""))


# ----------------------------------------------------------------------------------------------
# Ratios and the table.
# ----------------------------------------------------------------------------------------------

def _ok(result):
    return result is not None and "error" not in result


def add_ratios(results: list) -> None:
    """Each result's memory and time as multiples of its baseline's, measured in the same run."""
    by_key = {(r["objective"], r["tokens"], r["variant"]): r for r in results}
    for result in results:
        baseline_name = VARIANTS[result["variant"]].baseline
        baseline = by_key.get((result["objective"], result["tokens"], baseline_name)) if baseline_name else None
        result["baseline"] = baseline_name
        if _ok(result) and _ok(baseline):
            result["memory_ratio"] = result["peak_bytes"] / max(baseline["peak_bytes"], 1)
            result["time_ratio"] = result["seconds"] / baseline["seconds"]
            if result.get("first_call_seconds") and baseline.get("first_call_seconds"):
                result["first_call_ratio"] = result["first_call_seconds"] / baseline["first_call_seconds"]


def _ratio(value):
    return "—" if value is None else f"{value:.2f}x"


def markdown(record: dict) -> str:
    settings, results = record["settings"], record["results"]
    lines = [
        f"# {record['title']}",
        "",
        f"Machine: {machine_line(record['machine'])}. Date: {record['date']}. "
        f"hpd_kernels commit: {record['machine'].get('hpd_kernels_commit')}.",
        "",
        f"Command: `{record['command'].strip()}`",
        "",
        f"Forward + backward of each loss (gradients of every student input included), {settings['dtype']}, "
        f"vocabulary {settings['vocab']}, fused-linear hidden sizes student {settings['student_hidden']} / "
        f"teacher {settings['teacher_hidden']}. {_prompt_rows(settings)} Time: median of the timed calls, at least {settings['repeats']} "
        f"of them and more when calls are short, after {settings['warmup']} warm-up call(s) (torch.compile: "
        f"one more). "
        f"Peak memory: {settings['memory_method']}",
        *(["", settings["note"]] if settings.get("note") else []),
        "",
        "Ratios are `variant / hpd_kernels` at the same level (logits, or hidden states for fused-linear), "
        "measured in this one run: above 1x means the variant needs more memory or time than the library.",
        "",
        "## Summary: variant / ours",
        "",
    ]
    summary_variants = [name for name in VARIANTS if VARIANTS[name].baseline
                        and any(r["variant"] == name for r in results)]
    on_cpu = settings["device"] == "cpu"
    # On the CPU the first call (cold: a fresh process, compiling included) is a column of its own.
    columns = ("memory", "time", "first call") if on_cpu else ("memory", "time")
    header = ("| objective | tokens | " + " | ".join(f"{name} {column}" for name in summary_variants
                                                    for column in columns) + " |")
    lines += [header, "|---|---:|" + "---:|" * len(columns) * len(summary_variants)]
    by_key = {(r["objective"], r["tokens"], r["variant"]): r for r in results}
    for objective in settings["objectives"]:
        for tokens in settings["tokens"]:
            cells = []
            for name in summary_variants:
                result = by_key.get((objective, tokens, name), {})
                cells += [_ratio(result.get("memory_ratio")), _ratio(result.get("time_ratio"))]
                cells += [_ratio(result.get("first_call_ratio"))] if on_cpu else []
            lines.append(f"| {objective} | {tokens} | " + " | ".join(cells) + " |")

    load_header, load_rule = (" others' CPU (cores) |", "---:|") if on_cpu else ("", "")
    lines += ["", "## All measurements", ""]
    if on_cpu:
        retried = (f"a measurement above {CONTENDED_CORES} is retried, the least disturbed attempt kept"
                   if settings.get("retries", 1) else "not retried: a smoke run")
        lines += [f"`others' CPU`: cores that other processes kept busy during the timed calls ({retried}).", ""]
    if on_cpu:
        lines += ["`first call`: the first warm-up call of the fresh process (one-time costs included: "
                  "torch.compile's compiling; the library's torch backend runs its first calls eagerly and "
                  "compiles later, see `untimed`).", "",
                  "`untimed`: the calls before the timed ones and their total time: the warm-up, and for the "
                  "library the calls of its eager phase plus the one that compiles, so that every variant is "
                  "timed in its steady state.", ""]
    first_header, first_rule = ((" first call (ms) | first call / ours | untimed calls | untimed (s) |",
                                 "---:|---:|---:|---:|") if on_cpu else ("", ""))
    lines += ["| objective | tokens | variant | peak memory (MiB) | time (ms) | memory / ours | time / ours |"
              + first_header + load_header, "|---|---:|---|---:|---:|---:|---:|" + first_rule + load_rule]
    notes = []
    for result in results:
        if _ok(result):
            memory, seconds = f"{result['peak_bytes'] / MIB:.0f}", f"{result['seconds'] * 1e3:.1f}"
        else:
            notes.append(f"- {result['objective']}, {result['tokens']} tokens, {result['variant']}: {result['error']}")
            memory, seconds = f"error [{len(notes)}]", "—"
        load = result.get("other_cpu_load")
        load_cell = (f" {load:.2f} |" if load is not None else " — |") if on_cpu else ""
        first = result.get("first_call_seconds")
        untimed = result.get("untimed_seconds")
        first_cell = (f" {'—' if first is None else f'{first * 1e3:.0f}'} | {_ratio(result.get('first_call_ratio'))} |"
                      f" {result.get('untimed_calls', '—')} | {'—' if untimed is None else f'{untimed:.1f}'} |"
                      if on_cpu else "")
        lines.append(f"| {result['objective']} | {result['tokens']} | {result['variant']} | {memory} | {seconds} | "
                     f"{_ratio(result.get('memory_ratio'))} | {_ratio(result.get('time_ratio'))} |" + first_cell
                     + load_cell)
    contended = [r for r in results if (r.get("other_cpu_load") or 0) > CONTENDED_CORES]
    if contended:
        lines += ["", f"**{len(contended)} of {len(results)} CPU measurements ran while other processes kept more "
                  f"than {CONTENDED_CORES} cores busy; their times are not trustworthy.**"]
    if notes:
        lines += ["", "Errors:", ""] + [f"{index}. {note[2:]}" for index, note in enumerate(notes, 1)]
    if record.get("skipped"):
        lines += ["", "Not run:", ""] + [f"- {item}" for item in record["skipped"]]
    lines += ["", "Variants:", ""] + [f"- `{name}`: {VARIANTS[name].description}" for name in VARIANTS
                                      if any(r["variant"] == name for r in results)]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------
# The plot.
# ----------------------------------------------------------------------------------------------

STYLES = {
    "reference": ("tab:red", "o", "-"),
    "reference+torch.compile": ("tab:orange", "s", "-"),
    "hpd_kernels": ("tab:blue", "D", "-"),
    "liger LigerJSD": ("tab:green", "^", "-"),
    "reference fused-linear": ("tab:red", "o", "--"),
    "hpd_kernels fused-linear": ("tab:blue", "D", "--"),
    "liger LigerFusedLinearJSD": ("tab:green", "^", "--"),
}


def plot(record: dict, path: str) -> str:
    """Two panels per objective (HPD and JSD when present): peak memory and time against tokens."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    plain = FuncFormatter(lambda value, _: f"{value:g}")

    settings, results = record["settings"], record["results"]
    objectives = [o for o in PLOT_OBJECTIVES if o in settings["objectives"]] or list(settings["objectives"][:2])
    figure, axes = plt.subplots(len(objectives), 2, figsize=(13, 4.6 * len(objectives)), squeeze=False)
    for row, objective in enumerate(objectives):
        for column, (key, scale, label) in enumerate((("peak_bytes", MIB, "peak memory (MiB)"),
                                                      ("seconds", 1e-3, "time, forward + backward (ms)"))):
            axis = axes[row][column]
            for variant in VARIANTS:
                points = sorted((r["tokens"], r[key] / scale) for r in results
                                if r["objective"] == objective and r["variant"] == variant and _ok(r))
                if not points:
                    continue
                color, marker, linestyle = STYLES[variant]
                axis.plot([p[0] for p in points], [p[1] for p in points], color=color, marker=marker,
                          linestyle=linestyle, label=variant)
            axis.set_xscale("log", base=2)
            axis.set_yscale("log")
            axis.yaxis.set_major_formatter(plain)
            axis.yaxis.set_minor_formatter(plain)
            axis.set_xticks(settings["tokens"], [str(t) for t in settings["tokens"]])
            axis.set_xlabel("tokens (rows of logits)")
            axis.set_ylabel(label)
            axis.set_title(f"{objective}: {label.split(',')[0].split(' (')[0]}")
            axis.grid(True, which="both", alpha=0.3)
        axes[row][0].legend(fontsize=8, loc="upper left")
    machine = record["machine"]
    where = machine.get("gpu") or f"{machine['cpu']} ({machine['cpu_cores']} cores)"
    figure.suptitle(f"{settings['device']}, {settings['dtype']}, V={settings['vocab']}: {where}; "
                    f"lower is better", fontsize=11)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def _prompt_rows(settings: dict) -> str:
    # Results written before the setting existed used the default.
    fraction = settings.get("prompt_fraction", PROMPT_FRACTION)
    if fraction == 0:
        return "Every row is in the loss (no prompt rows)."
    return f"The first {fraction:.3g} of the rows are prompt tokens, outside the loss (label -100)."


def stem(settings: dict) -> str:
    fraction = settings.get("prompt_fraction", PROMPT_FRACTION)
    rows = "" if fraction == PROMPT_FRACTION else f"_prompt{fraction:g}"
    return f"bench_{settings['device']}_{settings['dtype']}_V{settings['vocab']}{rows}"


def now_iso():
    return datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat()
