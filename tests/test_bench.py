"""`slmops bench` on a tiny bundle: the report's schema, its files, and the refusals."""

import csv
import io
import json
import shutil

import pytest
from click.testing import CliRunner

from slmops.cli import cli
from test_export import make_adapter


@pytest.fixture(scope="module")
def tiny_bundle(tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    qv = make_adapter(tiny_model, root / "qv-adapter", 4, ["q_proj", "v_proj"], seed=1)
    out = root / "bundle"
    result = CliRunner().invoke(cli, ["export", "-m", str(tiny_model), "-a", f"qv={qv}", "-o", str(out)])
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def report(tiny_bundle):
    result = CliRunner().invoke(
        cli, ["bench", str(tiny_bundle), "--scenario", "16:8", "--scenario", "48:8", "--reps", "2", "--json"]
    )
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_report_schema(report):
    assert set(report) == {
        "bundle",
        "machine",
        "options",
        "bandwidth_gbs",
        "bytes_per_token",
        "rows",
        "adapter_load_ms",
        "adapter_switch_ms",
        "adapter_overhead",
        "summary",
        "kv_cache",
    }
    assert {"cpu", "cores", "memory_gib", "versions"} <= set(report["machine"])
    assert report["machine"]["versions"]["onnxruntime-genai"]
    assert report["bandwidth_gbs"] > 0.1
    engines = {(r["engine"], r["variant"], r["adapter"]) for r in report["rows"]}
    assert engines == {
        ("onnxruntime-genai", "int4 cpu", "base"),
        ("onnxruntime-genai", "int4 cpu", "qv"),
        ("onnxruntime-genai", "int4 cpu, no LoRA inputs", "base"),
        ("pytorch", "fp32", "base"),
        ("pytorch", "fp32", "qv"),
    }
    for row in report["rows"]:
        assert row["scenario"] in ("16in/8out", "48in/8out")
        assert row["decode_tps_min"] <= row["decode_tps"] <= row["decode_tps_max"]
        assert row["ttft_ms"] > 0 and row["e2e_ms"] >= row["ttft_ms"] and row["peak_rss_mb"] > 10
        assert row["runs"] == (2 if row["engine"] == "onnxruntime-genai" else 1)
    ort = [r for r in report["rows"] if r["engine"] == "onnxruntime-genai" and "no LoRA" not in r["variant"]]
    assert all(0 < r["bound_fraction"] for r in ort)
    assert report["adapter_switch_ms"] >= 0 and set(report["adapter_load_ms"]) == {"qv"}
    assert set(report["adapter_overhead"]["16in/8out"]) == {"qv", "base (empty LoRA inputs)"}
    summary = report["summary"]["16in/8out"]
    assert summary["x_pytorch"] > 0 and summary["prefill_x_pytorch"] > 0 and report["kv_cache"] == "fp32"
    base = next(r for r in ort if r["adapter"] == "base" and r["scenario"] == "16in/8out")
    assert summary["ort_prefill_tps"] == base["prefill_tps"] and summary["bound_fraction"] == base["bound_fraction"]


def test_report_files_next_to_the_bundle(report, tiny_bundle):
    folder = tiny_bundle.parent / "bundle-bench"
    assert {p.name for p in folder.iterdir() if p.is_file()} >= {
        "results.json",
        "results.csv",
        "report.md",
        "decode.png",
        "latency.png",
    }
    rows = list(csv.DictReader(io.StringIO((folder / "results.csv").read_text())))
    assert len(rows) == len(report["rows"]) and "decode_tps" in rows[0]
    text = (folder / "report.md").read_text()
    assert "| engine |" in text and report["machine"]["cpu"] in text and "![decode.png](decode.png)" in text
    assert (folder / "decode.png").read_bytes()[:4] == b"\x89PNG"
    assert CliRunner().invoke(cli, ["verify", str(tiny_bundle)]).exit_code == 0  # nothing written inside


def test_table_and_csv_output(tiny_bundle, tmp_path):
    args = [
        "bench",
        str(tiny_bundle),
        "--scenario",
        "8:4",
        "--reps",
        "1",
        "--warmup",
        "0",
        "--baseline",
        "none",
        "--skip-no-lora-base",
        "-o",
        str(tmp_path / "r"),
    ]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert "decode tok/s" in result.stdout and "adapter switch" in result.stdout
    assert "pytorch" not in result.stdout
    result = CliRunner().invoke(cli, [*args, "--csv", "-a", "qv"])
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    assert [r["adapter"] for r in rows] == ["qv"]


@pytest.mark.parametrize(
    "args,message",
    [
        (
            ["--ep", "cuda"],
            "execution provider cuda is not available here (ONNX Runtime 1.32.0 has: cpu); "
            "pick one of those or run on a machine with that device",
        ),
        (
            ["--ep", "qnn"],
            "execution provider qnn is not available here (ONNX Runtime 1.32.0 has: cpu); "
            "pick one of those or run on a machine with that device",
        ),
        (["-a", "nope"], "unknown adapter(s) nope; this bundle has: base, qv"),
        (["--scenario", "128"], "--scenario '128': expected PROMPT:NEW token counts, e.g. 128:128 (NEW at least 2)"),
        (["--json", "--csv"], "--json and --csv conflict; pass one"),
        (
            ["--scenario", "500:16"],
            "scenario 500in/16out is longer than the model's context of 512 tokens; pass shorter "
            "--scenario PROMPT:NEW values",
        ),
    ],
)
def test_bench_refusals(tiny_bundle, args, message):
    from slmops.core.choices import available_targets

    if "--ep" in args and args[1] in available_targets():
        pytest.skip(f"{args[1]} is available on this machine")
    result = CliRunner().invoke(cli, ["bench", str(tiny_bundle), *args])
    assert (result.exit_code, result.output.strip()) == (2, f"Error: {message}")


def test_bench_refuses_a_bundle_for_another_ep(tiny_bundle, tmp_path):
    other = tmp_path / "cuda-bundle"
    shutil.copytree(tiny_bundle, other)
    manifest = json.loads((other / "slmops.json").read_text())
    manifest["target"].update(name="cuda", execution_provider="CUDAExecutionProvider")
    (other / "slmops.json").write_text(json.dumps(manifest))
    result = CliRunner().invoke(cli, ["bench", str(other), "--ep", "cpu"])
    assert (result.exit_code, result.output.strip()) == (
        2,
        "Error: this bundle is built for cuda, not cpu; export one for cpu (slmops export --target cpu) or drop --ep",
    )


def test_llamacpp_baseline_needs_the_package(tiny_bundle, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llama_cpp" else real(name, *a))
    result = CliRunner().invoke(cli, ["bench", str(tiny_bundle), "--baseline", "llamacpp"])
    assert result.exit_code == 2 and "needs llama-cpp-python: pip install 'slmops[llamacpp]'" in result.output


@pytest.mark.slow  # 4 exports and a bench of each
def test_matrix_exports_and_compares(tiny_model, tmp_path):
    qv = make_adapter(tiny_model, tmp_path / "qv-adapter", 4, ["q_proj", "v_proj"], seed=1)
    out = tmp_path / "matrix"
    result = CliRunner().invoke(
        cli,
        [
            "bench",
            "--matrix",
            "-m",
            str(tiny_model),
            "-a",
            f"qv={qv}",
            "--precisions",
            "int4:rtn,fp32",
            "--scenario",
            "8:4",
            "--reps",
            "1",
            "-o",
            str(out),
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert [(r["target"], r["precision"], r["adapter"]) for r in rows] == [
        ("cpu", "int4 rtn", "base"),
        ("cpu", "int4 rtn", "qv"),
        ("cpu", "fp32", "base"),
        ("cpu", "fp32", "qv"),
    ]
    assert all(r["agreement"] >= 0.99 for r in rows if r["precision"] == "fp32")  # argmax ties may flip
    assert all(r["x_pytorch"] > 0 and r["decode_tps"] > 0 for r in rows)
    assert (out / "matrix.md").read_text().count("| cpu |") == 4
    assert (out / "matrix.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((out / "cpu-int4-rtn" / "slmops.json").read_text())["quantization"]["int4_algo"] == "rtn"


@pytest.mark.parametrize(
    "args,message",
    [
        (["--matrix", "BUNDLE"], "--matrix builds its own bundles: drop the BUNDLE argument"),
        (["--matrix"], "--matrix needs --recipe R or --model M (and --adapter NAME=PATH for adapters)"),
        (
            ["--matrix", "-m", "x", "--precisions", "int3,int4:best"],
            "--precisions int3, int4:best: choose from int4, "
            "int8, fp16, fp32, or int4:METHOD with METHOD one of auto, gguf, default, rtn, rtn_last, k_quant, k_quant_mixed, "
            "k_quant_last",
        ),
        ([], "no bundle: pass the folder `slmops export -o` wrote (or --matrix with --recipe)"),
    ],
)
def test_matrix_refusals(tiny_bundle, args, message):
    args = [str(tiny_bundle) if a == "BUNDLE" else a for a in args]
    result = CliRunner().invoke(cli, ["bench", *args])
    assert (result.exit_code, result.output.strip()) == (2, f"Error: {message}")


def test_default_scenarios_longer_than_the_context_are_skipped(tiny_bundle, tmp_path):
    result = CliRunner().invoke(
        cli,
        [
            "bench",
            str(tiny_bundle),
            "--reps",
            "1",
            "--warmup",
            "0",
            "--baseline",
            "none",
            "--skip-no-lora-base",
            "-a",
            "base",
            "-o",
            str(tmp_path / "r"),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "skipping scenario 1024in/128out: longer than the model's context of 512 tokens" in result.stderr
    report = json.loads((tmp_path / "r" / "results.json").read_text())
    assert {r["scenario"] for r in report["rows"]} == {"128in/128out"}
