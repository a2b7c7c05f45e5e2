"""`python -m bench.gpu_report`: the GPU check's one JSON, `gpu_check.json`, merged from its steps' outputs.

bench/gpu_check.sh runs each step with a time limit; every step writes its own JSON (a fragment, in the
check's work folder, or its usual output under `$OUT`) and the script appends `name exit seconds limit`
to `steps.tsv` there. This merges them, standard library only (no torch: it runs in a second):

    schema, date, device, dry_run, passed   what ran, and whether every step passed
    steps            [{name, status ("ok", "timed out", "failed (exit N)", "not run"), exit, seconds, limit_s}]
    preflight        GPU, versions, C compiler, what is importable (liger_kernel, trl), problems
    correctness      per objective: status, passed/failed counts; `by_objective_and_dtype` ("pass"/"FAIL"
                     per objective and dtype, the benchmark shape as its own column); every check's record
    floors           copy and read bandwidth (GB/s), the GEMM rate (TFLOP/s), their rows
    static_model     which `bench.sass` JSON was joined (its Triton, the running one's, any fallback), its
                     bandwidth and the copy bandwidth measured in the same run
    kernels          each kernel alone: measured ms next to the model's ms, as generated and rescaled to the
                     measured copy bandwidth (`model_ms_at_copy`), and whether its outputs were finite
    fused_linear     the fused-linear HPD step against its four-GEMM floor, finite, the `grad_W` GEMM path
    finite           every finite-value check of the large shapes: {check: true/false}
    trainer          bf16 against fp32: every step's loss, time and peak memory
    benchmark        the reduced `python -m bench`: its settings and one row per (objective, variant)
    liger_jsd        Liger's JSD rows of that benchmark, when liger_kernel imports (else why not)
    trl_compare      `python -m bench.trl_compare` (ours against TRL's Triton ChunkedDivergenceFunction), when
                     trl imports (else why not)

A step that timed out or failed keeps its status in `steps`, and its section holds what it wrote before
(or null fields and the status). The dry run (`DRY_RUN=1`, the CPU) writes the same keys.

    python -m bench.gpu_report --work WORK_DIR --out OUT_DIR --device cuda [--dry-run]
"""

from __future__ import annotations

import argparse
import datetime
import glob
import json
import os
import re
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
SCHEMA = 1
OUTPUT = "gpu_check.json"
TOP_LEVEL_KEYS = ("schema", "date", "device", "dry_run", "passed", "steps", "preflight", "correctness", "floors",
                  "static_model", "kernels", "fused_linear", "finite", "trainer", "benchmark", "liger_jsd",
                  "trl_compare")


# ----------------------------------------------------------------------------------------------
# The static model: which JSON, and its times at the measured bandwidth (used by bench/gpu_floors.py).
# ----------------------------------------------------------------------------------------------

def _major_minor(version):
    return tuple(int(part) for part in re.findall(r"\d+", str(version))[:2])


def _model_triton(path):
    """The Triton release a `bench.sass` JSON was generated under: its "triton" field, else its name's
    `_tritonXY` suffix, else None."""
    try:
        with open(path) as handle:
            version = json.load(handle).get("triton")
    except (OSError, ValueError, AttributeError):
        return None
    match = re.search(r"_triton(\d)(\d+)\.json$", path)
    return version or (f"{match.group(1)}.{match.group(2)}" if match else None)


def choose_static_model(triton_version, folder=RESULTS, explicit=None):
    """{path, triton, running_triton, matched, note}: `explicit` when given; else the `sass_sm90*.json` in
    `folder` generated under the running Triton's major.minor; else the newest Triton's, said so."""
    if explicit:
        model = _model_triton(explicit) if os.path.exists(explicit) else None
        return dict(path=explicit if os.path.exists(explicit) else None, triton=model, running_triton=triton_version,
                    matched=model is not None and _major_minor(model) == _major_minor(triton_version),
                    note=f"{explicit} (given; generated under triton {model})")
    candidates = [(path, _model_triton(path)) for path in sorted(glob.glob(os.path.join(folder, "sass_sm90*.json")))]
    candidates = [(path, version) for path, version in candidates if version]
    for path, version in candidates:
        if _major_minor(version) == _major_minor(triton_version):
            return dict(path=path, triton=version, running_triton=triton_version, matched=True,
                        note=f"{os.path.basename(path)}, generated under triton {version} (running {triton_version})")
    if not candidates:
        return dict(path=None, triton=None, running_triton=triton_version, matched=False,
                    note=f"no bench.sass JSON in {folder}")
    path, version = max(candidates, key=lambda candidate: _major_minor(candidate[1]))
    return dict(path=path, triton=version, running_triton=triton_version, matched=False,
                note=f"FELL BACK to {os.path.basename(path)} (triton {version}): none generated under triton "
                     f"{'.'.join(map(str, _major_minor(triton_version)))}")


def rescale(parts_ms, model_bandwidth, measured_bandwidth, scale=1.0):
    """The model's prediction with its memory time at `measured_bandwidth` (bytes/s) instead of its own:
    issue and MUFU times are unchanged, the prediction is the largest of the three. `scale`: N V over
    the model's."""
    memory = parts_ms["memory"] * model_bandwidth / measured_bandwidth
    times = {"issue": parts_ms["issue"], "MUFU": parts_ms["mufu"], "memory": memory}
    bound = max(times, key=times.get)
    return dict(model_memory_ms_at_copy=memory * scale, model_ms_at_copy=times[bound] * scale,
                model_bound_at_copy=bound)


# ----------------------------------------------------------------------------------------------
# Merging.
# ----------------------------------------------------------------------------------------------

def _load(path):
    try:
        with open(path) as handle:
            return json.load(handle)
    except (OSError, ValueError):
        return None


def status_of(code):
    if code is None:
        return "not run"
    return {0: "ok", 124: "timed out", 137: "timed out"}.get(code, f"failed (exit {code})")


def read_steps(work):
    steps = []
    try:
        with open(os.path.join(work, "steps.tsv")) as handle:
            for line in handle:
                name, code, seconds, limit = line.split()
                steps.append(dict(name=name, status=status_of(int(code)), exit=int(code), seconds=int(seconds),
                                  limit_s=int(limit)))
    except OSError:
        pass
    return steps


def _process_status(work, stem):
    """(exit, seconds) of one correctness process, from its `.status` file."""
    try:
        with open(os.path.join(work, f"{stem}.status")) as handle:
            code, took = handle.read().split()
        return int(code), int(took)
    except (OSError, ValueError):
        return None, None


def correctness(work):
    objectives, checks, table = {}, [], {}
    for path in sorted(glob.glob(os.path.join(work, "correctness_*.status"))):
        stem = os.path.basename(path)[:-len(".status")]
        name = stem[len("correctness_"):]
        code, took = _process_status(work, stem)
        fragment = _load(os.path.join(work, f"{stem}.json")) or {}
        objectives[name] = dict(status=status_of(code), exit=code, seconds=took, passed=fragment.get("passed"),
                                failed=fragment.get("failed"))
        for check in fragment.get("checks", []):
            checks.append(check)
            column = "benchmark shape" if check.get("kind") == "benchmark shape" else check.get("dtype")
            row = table.setdefault(check.get("objective") or name, {})
            row[column] = "FAIL" if row.get(column) == "FAIL" or not check["ok"] else "pass"
    ok = bool(objectives) and all(entry["status"] == "ok" for entry in objectives.values())
    return dict(status="ok" if ok else "failed" if objectives else "not run", objectives=objectives,
                by_objective_and_dtype=table, checks=checks)


def floors_sections(out):
    record = _load(os.path.join(out, "gpu_floors.json")) or {}
    rows = {row["name"].split()[0]: row for row in record.get("floors", [])}
    floors = dict(copy_gb_per_s=rows.get("copy", {}).get("gb_per_s"),
                  read_gb_per_s=rows.get("read", {}).get("gb_per_s"),
                  gemm_tflop_per_s=rows.get("GEMM", {}).get("tflop_per_s"), rows=record.get("floors"),
                  settings=record.get("settings"), failures=record.get("failures"))
    model = dict((record.get("settings") or {}).get("static_model") or {})
    model_json = _load(model["path"]) if model.get("path") else None
    model["bandwidth_gb_per_s"] = ((model_json or {}).get("model", {}).get("bandwidth") or 0) / 1e9 or None
    model["measured_copy_gb_per_s"] = floors["copy_gb_per_s"]
    kernels = [dict(row, time_over_model_at_copy=row["ms"] / row["model_ms_at_copy"])
               if "ms" in row and row.get("model_ms_at_copy") else row for row in record.get("kernels", [])]
    fused = record.get("fused_linear") or {"grad_w_gemm": None, "finite": None}
    finite = {f"kernel {row['name']}": row.get("finite") for row in record.get("kernels", []) if "name" in row}
    finite["fused-linear " + str(fused.get("name"))] = fused.get("finite")
    return floors, model, kernels, fused, finite


def benchmark_sections(out, device, preflight):
    paths = sorted(glob.glob(os.path.join(out, f"bench_{device}_*.json")))
    record = _load(paths[0]) if paths else None
    keep = ("objective", "tokens", "variant", "seconds", "first_call_seconds", "peak_bytes", "loss", "time_ratio",
            "memory_ratio", "error")
    rows = [{key: row[key] for key in keep if key in row} for row in (record or {}).get("results", [])]
    benchmark = dict(file=os.path.basename(paths[0]) if paths else None, settings=(record or {}).get("settings"),
                     skipped=(record or {}).get("skipped"), results=rows)
    importable = (preflight or {}).get("importable", {}).get("liger_kernel")
    liger = [row for row in rows if row["variant"].startswith("liger")]
    note = ("liger_kernel is not importable" if importable is False else
            None if liger else "no Liger rows in the benchmark")
    return benchmark, dict(importable=importable, results=liger, note=note)


def trl_section(work, preflight):
    importable = (preflight or {}).get("importable", {}).get("trl")
    paths = sorted(glob.glob(os.path.join(work, "trl", "trl_*.json")))
    record = _load(paths[0]) if paths else None
    if record is None:
        return dict(importable=importable, note="trl is not importable: not compared" if importable is False
                    else "no output", correctness=None, results=[], summary=None)
    return dict(importable=importable, note=None, settings=record.get("settings"),
                correctness=record.get("correctness"), results=record.get("results"), summary=record.get("summary"))


def merge(work, out, device, dry_run):
    steps = read_steps(work)
    by_name = {step["name"]: step for step in steps}
    preflight = _load(os.path.join(work, "preflight.json"))
    floors, model, kernels, fused, finite = floors_sections(out)
    checks = correctness(work)
    for check in checks["checks"]:
        if "finite" in check:
            finite.update({f"{check['name']}: {key}": value for key, value in check["finite"].items()})
    trainer = _load(os.path.join(work, "trainer.json")) or {"steps": None, "passed": None}
    benchmark, liger = benchmark_sections(out, device, preflight)
    sections = dict(preflight=preflight or {}, correctness=checks, floors=floors, static_model=model,
                    kernels=kernels, fused_linear=fused, finite=finite, trainer=trainer, benchmark=benchmark,
                    liger_jsd=liger, trl_compare=trl_section(work, preflight))
    step_of = dict(preflight="preflight", correctness="correctness", floors="floors", static_model="floors",
                   fused_linear="floors", trainer="trainer", benchmark="benchmark", liger_jsd="benchmark",
                   trl_compare="trl")
    for section, step in step_of.items():
        if isinstance(sections[section], dict):
            sections[section]["step_status"] = by_name.get(step, {}).get("status", "not run")
    record = dict(schema=SCHEMA, date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  device=device, dry_run=dry_run, passed=bool(steps) and all(s["status"] == "ok" for s in steps),
                  steps=steps, **sections)
    return {key: record[key] for key in TOP_LEVEL_KEYS}


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_report", description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", required=True, help="the check's work folder (steps.tsv, the fragments)")
    parser.add_argument("--out", required=True, help="the check's $OUT (gpu_floors.json, bench_*.json); "
                                                     f"{OUTPUT} is written there")
    parser.add_argument("--device", choices=("cuda", "cpu"), required=True)
    parser.add_argument("--dry-run", action="store_true")
    args = parser.parse_args(argv)
    record = merge(args.work, args.out, args.device, args.dry_run)
    path = os.path.join(args.out, OUTPUT)
    with open(path, "w") as handle:
        json.dump(record, handle, indent=1, default=str)
    failed = [step["name"] for step in record["steps"] if step["status"] != "ok"]
    print(f"wrote {path}: {len(record['steps'])} steps" + (f", not ok: {', '.join(failed)}" if failed else ", all ok"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
