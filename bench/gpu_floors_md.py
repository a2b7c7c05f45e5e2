"""The Markdown report of `python -m bench.gpu_floors` (`gpu_floors.md`), from its JSON record."""

from __future__ import annotations

from bench import report

GB = 1e9


def markdown(record: dict, model_rows: int, model_vocab: int) -> str:
    """`gpu_floors.md`: the floors, each kernel alone next to the static model, the fused-linear step."""
    settings = record["settings"]
    lines = [
        f"# {record['title']}",
        "",
        f"Machine: {report.machine_line(record['machine'])}. Date: {record['date']}. "
        f"hpd_kernels commit: {record['machine'].get('hpd_kernels_commit')}.",
        "",
        f"Command: `{record['command']}`. N={settings['rows']} rows, V={settings['vocab']}, {settings['dtype']}, "
        f"kernels: {settings['kernels']}. Time: median of {settings['repeats']} calls after {settings['warmup']} "
        f"warm-up calls (fused-linear: {settings['fused_repeats']} after 1). GB = 1e9 bytes.",
        "",
        "## Floors",
        "",
        "| measurement | time (ms) | bytes (GB) | GB/s | TFLOP/s |",
        "|---|---:|---:|---:|---:|",
    ]
    cell = lambda row, key, scale=1.0, digits=1: f"{row[key] / scale:.{digits}f}" if key in row else "—"
    for row in record["floors"]:
        if "error" in row:
            lines.append(f"| {row['name']} | error: {row['error']} | | | |")
            continue
        lines.append(f"| {row['name']} | {row['ms']:.3f} | {cell(row, 'bytes', GB, 3)} | {cell(row, 'gb_per_s')} "
                     f"| {cell(row, 'tflop_per_s')} |")
    lines += ["", "## Each kernel alone", "",
              "Bytes: forward, student + teacher once per vocabulary pass (2 passes for JSD, skew KL and TVD); "
              "backward, student (+ teacher for the divergences) read and the gradient written.", "",
              f"Model: the static model's prediction for the same launch (`python -m bench.sass`, "
              f"{(settings.get('static_model') or {}).get('note') or settings.get('model') or 'not found'}; its "
              f"N={model_rows}, V={model_vocab}, scaled by N V).", "",
              "Model at copy: its memory time rescaled to the copy bandwidth measured above.", "",
              "| objective | kernel | time (ms) | bytes (GB) | GB/s | % of copy | % of read | model (ms) "
              "| model at copy (ms) | time / model at copy | finite |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for row in record["kernels"]:
        if "error" in row:
            lines.append(f"| {row['objective']} | {row['direction']} | error: {row['error']} | | | | | | | | |")
            continue
        versus_model = f"{row['ms'] / row['model_ms_at_copy']:.2f}x" if "model_ms_at_copy" in row else "—"
        lines.append(f"| {row['objective']} | {row['direction']} | {row['ms']:.3f} | {row['bytes'] / GB:.3f} "
                     f"| {row['gb_per_s']:.1f} | {cell(row, 'percent_of_copy')} | {cell(row, 'percent_of_read')} "
                     f"| {cell(row, 'model_ms', digits=3)} | {cell(row, 'model_ms_at_copy', digits=3)} | {versus_model} "
                     f"| {'yes' if row.get('finite') else '**no**'} |")
    fused = record["fused_linear"]
    lines += ["", "## Fused-linear HPD against its four-GEMM floor", "",
              "Floor: 4 GEMMs of 2 N H V flops (student and teacher logits, d hidden, d weight) at the GEMM rate above.",
              "", "| measurement | time (ms) | floor (ms) | % of floor | finite | grad_W GEMM |", "|---|---:|---:|---:|---|---|"]
    if "error" in fused:
        lines.append(f"| {fused['name']} | error: {fused['error']} | | | | |")
    else:
        lines.append(f"| {fused['name']} | {fused['ms']:.2f} | {cell(fused, 'floor_ms', digits=2)} "
                     f"| {cell(fused, 'percent_of_floor')} | {'yes' if fused.get('finite') else '**no**'} "
                     f"| {fused.get('grad_w_gemm')} |")
    return "\n".join(lines) + "\n"
