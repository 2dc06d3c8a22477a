"""`slmops bench` results as a terminal table, JSON, CSV, a markdown report and PNG charts."""

from __future__ import annotations

import csv
import io
import json
from dataclasses import asdict, fields
from pathlib import Path

from slmops.measuring.bench import MatrixRow, Report, Row

COLUMNS = [  # (header, Row field, format)
    ("engine", "engine", "{}"),
    ("variant", "variant", "{}"),
    ("adapter", "adapter", "{}"),
    ("scenario", "scenario", "{}"),
    ("TTFT ms", "ttft_ms", "{:.0f}"),
    ("prefill tok/s", "prefill_tps", "{:.0f}"),
    ("decode tok/s", "decode_tps", "{:.1f}"),
    ("decode min-max", None, None),
    ("e2e ms", "e2e_ms", "{:.0f}"),
    ("peak RSS MB", "peak_rss_mb", "{:.0f}"),
    ("disk MB", "disk_mb", "{:.1f}"),
    ("of bound", "bound_fraction", "{:.0%}"),
]


def _cells(row: Row) -> list[str]:
    out = []
    for _, name, fmt in COLUMNS:
        if name is None:
            out.append(f"{row.decode_tps_min:.0f}-{row.decode_tps_max:.0f}")
        else:
            value = getattr(row, name)
            assert fmt is not None  # every column with a Row field has a format
            out.append("-" if value is None else fmt.format(value))
    return out


def table(report: Report) -> str:
    """A fixed-width table and the headline lines, for the terminal."""
    rows = [[h for h, _, _ in COLUMNS]] + [_cells(r) for r in report.rows]
    widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS))]
    lines = ["  ".join(c.rjust(w) if i > 3 else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines + [""] + headline(report))


def headline(report: Report) -> list[str]:
    m = report.machine
    lines = [
        f"machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB; threads {report.options['threads']}; "
        f"read bandwidth {report.bandwidth_gbs:.1f} GB/s; onnxruntime-genai "
        f"{m['versions'].get('onnxruntime-genai')}, {report.kv_cache} KV cache"
    ]
    for scenario, s in report.summary.items():
        if s.get("ort_decode_tps") is None:
            continue  # the base was not measured (--adapter without base)
        parts = [f"ORT decode {s['ort_decode_tps']:.1f} tok/s"]
        if "x_pytorch" in s:
            parts.append(f"{s['x_pytorch']:.1f}x PyTorch fp32")
        if "x_llamacpp" in s:
            verdict = "ahead of" if s["x_llamacpp"] > 1.05 else "NOT clearly ahead of"
            parts.append(f"{s['x_llamacpp']:.2f}x llama.cpp ({verdict} it)")
        if s.get("ort_prefill_tps"):
            ratios = [
                f"{s[f'prefill_x_{k}']:.2f}x {name}"
                for k, name in (("llamacpp", "llama.cpp"), ("pytorch", "PyTorch"))
                if f"prefill_x_{k}" in s
            ]
            parts.append(f"prefill {s['ort_prefill_tps']:.0f} tok/s" + (f" ({', '.join(ratios)})" if ratios else ""))
        lines.append(f"{scenario}: " + ", ".join(parts))
    for scenario, overheads in report.adapter_overhead.items():
        shown = ", ".join(f"{name} {value:+.0%}" for name, value in overheads.items())
        lines.append(f"{scenario}: decode cost vs the same base without LoRA inputs: {shown}")
    if report.adapter_switch_ms is not None:
        loads = ", ".join(f"{k} {v:.1f} ms" for k, v in report.adapter_load_ms.items())
        lines.append(f"adapter switch {report.adapter_switch_ms:.3f} ms (median); adapter load {loads}")
    return lines


def to_json(report: Report) -> str:
    return json.dumps(asdict(report), indent=2)


def to_csv(report: Report) -> str:
    buffer = io.StringIO()
    names = [f.name for f in fields(Row)]
    writer = csv.DictWriter(buffer, fieldnames=names)
    writer.writeheader()
    for row in report.rows:
        writer.writerow(asdict(row))
    return buffer.getvalue()


def markdown(report: Report, charts: list[str]) -> str:
    m = report.machine
    versions = ", ".join(f"{k} {v}" for k, v in m["versions"].items() if v)
    header = "| " + " | ".join(h for h, _, _ in COLUMNS) + " |"
    lines = [
        f"# slmops bench: {Path(report.bundle).name}",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB, {m['os']}. {versions}.",
        "",
        f"Each row: the median of {report.options['reps']} runs after {report.options['warmup']} warm-up "
        "(PyTorch: " + str(report.options["pytorch_reps"]) + "), greedy, exactly the stated new tokens, "
        f'{report.options["threads"]} threads. "of bound": decode tok/s as a fraction of memory read '
        "bandwidth / bytes read per token (weights, adapter, KV cache).",
        "",
        header,
        "|" + "---|" * len(COLUMNS),
    ]
    lines += ["| " + " | ".join(_cells(r)) + " |" for r in report.rows]
    lines += ["", "## Summary", ""] + [f"- {line}" for line in headline(report)] + [""]
    lines += [f"![{c}]({c})" for c in charts] + [""]
    return "\n".join(lines)


def charts(report: Report, folder: Path) -> list[str]:
    """decode.png: decode tok/s per adapter and engine; latency.png: end-to-end latency vs prompt length."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scenario = report.rows[0].scenario if report.rows else ""
    picked = [r for r in report.rows if r.scenario == scenario]
    fig, ax = plt.subplots(figsize=(8, 0.5 + 0.45 * max(1, len(picked))))
    labels = [f"{r.engine} {r.variant} / {r.adapter}" for r in picked]
    ax.barh(
        labels,
        [r.decode_tps for r in picked],
        color=["#1f77b4" if r.engine == "onnxruntime-genai" else "#999999" for r in picked],
    )
    ax.invert_yaxis()
    ax.set_xlabel(f"decode tokens/s ({scenario})")
    fig.tight_layout()
    _save(fig, folder / "decode.png")
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4))
    series: dict[str, list[tuple[int, float]]] = {}
    for r in report.rows:
        series.setdefault(f"{r.engine} {r.variant} / {r.adapter}", []).append((r.prompt_tokens, r.e2e_ms))
    for label, points in series.items():
        points.sort()
        ax.plot([p for p, _ in points], [ms for _, ms in points], marker="o", label=label)
    ax.set_xlabel("prompt tokens")
    ax.set_ylabel("end-to-end latency, ms")
    ax.set_xscale("log", base=2)
    ax.legend(fontsize=7)
    fig.tight_layout()
    _save(fig, folder / "latency.png")
    plt.close(fig)
    return ["decode.png", "latency.png"]


def _save(fig, path: Path) -> None:
    from slmops.core.files import write_file

    write_file(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))


def write_reports(report: Report, folder: Path) -> list[Path]:
    """results.json, results.csv, report.md and the charts, into `folder` (each written via a temp name)."""
    folder.mkdir(parents=True, exist_ok=True)
    names = charts(report, folder)
    outputs = {"results.json": to_json(report), "results.csv": to_csv(report), "report.md": markdown(report, names)}
    from slmops.core.files import write_text

    for name, text in outputs.items():
        write_text(folder / name, text)
    return [folder / n for n in (*outputs, *names)]


MATRIX_COLUMNS = [
    ("target", "target", "{}"),
    ("precision", "precision", "{}"),
    ("adapter", "adapter", "{}"),
    ("agreement", "agreement", "{:.1%}"),
    ("KL mean", "kl_mean", "{:.4f}"),
    ("decode tok/s", "decode_tps", "{:.1f}"),
    ("x PyTorch", "x_pytorch", "{:.1f}x"),
    ("prefill tok/s", "prefill_tps", "{:.0f}"),
    ("TTFT ms", "ttft_ms", "{:.0f}"),
    ("disk MB", "disk_mb", "{:.0f}"),
    ("peak RSS MB", "peak_rss_mb", "{:.0f}"),
]


def _matrix_cells(row: MatrixRow) -> list[str]:
    return ["-" if getattr(row, f) is None else fmt.format(getattr(row, f)) for _, f, fmt in MATRIX_COLUMNS]


def matrix_table(rows: list[MatrixRow]) -> str:
    cells = [[h for h, _, _ in MATRIX_COLUMNS]] + [_matrix_cells(r) for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(MATRIX_COLUMNS))]
    lines = ["  ".join(c.rjust(w) if i > 2 else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def write_matrix(rows: list[MatrixRow], machine: dict, folder: Path, scenario: str) -> list[Path]:
    """matrix.json and matrix.md: agreement with PyTorch fp32 next to speed, per target, precision, adapter."""
    folder.mkdir(parents=True, exist_ok=True)
    versions = ", ".join(f"{k} {v}" for k, v in machine["versions"].items() if v)
    md = [
        f"# slmops bench --matrix ({scenario})",
        "",
        f"Machine: {machine['cpu']}, {machine['cores']} cores, {machine['memory_gib']} GiB. {versions}.",
        "",
        "| " + " | ".join(h for h, _, _ in MATRIX_COLUMNS) + " |",
        "|" + "---|" * len(MATRIX_COLUMNS),
    ]
    md += ["| " + " | ".join(_matrix_cells(r)) + " |" for r in rows]
    md += ["", "![matrix.png](matrix.png)"]
    _matrix_chart(rows, folder / "matrix.png", scenario)
    outputs = {
        "matrix.json": json.dumps(
            {"machine": machine, "scenario": scenario, "rows": [asdict(r) for r in rows]}, indent=2
        ),
        "matrix.md": "\n".join(md) + "\n",
    }
    from slmops.core.files import write_text

    for name, text in outputs.items():
        write_text(folder / name, text)
    return [folder / n for n in (*outputs, "matrix.png")]


def _matrix_chart(rows: list[MatrixRow], path: Path, scenario: str) -> None:
    """Decode tok/s per target, precision and adapter, each bar labelled with its agreement."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 0.5 + 0.45 * max(1, len(rows))))
    labels = [f"{r.target} {r.precision} / {r.adapter}" for r in rows]
    bars = ax.barh(labels, [r.decode_tps for r in rows], color="#1f77b4")
    for bar, r in zip(bars, rows):
        if r.agreement is not None:
            ax.text(
                bar.get_width(),
                bar.get_y() + bar.get_height() / 2,
                f" {r.agreement:.0%} agree",
                va="center",
                fontsize=8,
            )
    ax.invert_yaxis()
    ax.set_xlabel(f"decode tokens/s ({scenario}); label: top-1 agreement with PyTorch fp32")
    fig.tight_layout()
    _save(fig, path)
