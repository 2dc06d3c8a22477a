"""`slmops serve` on a tiny bundle: a real server on a loopback port, the official openai client, raw HTTP."""

import http.client
import json
import socket
import threading
import time

import pytest
from click.testing import CliRunner

from slmops.cli import cli
from test_export import make_adapter

KEY = "test-key"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def bundle(tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    qv = make_adapter(tiny_model, root / "qv-adapter", 4, ["q_proj", "v_proj"], seed=1, std=0.5)
    out = root / "bundle"
    result = CliRunner().invoke(cli, ["export", "-m", str(tiny_model), "-a", f"qv={qv}", "-p", "fp32", "-o", str(out)])
    assert result.exit_code == 0, result.output
    return out


def _start(app):
    import uvicorn

    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    for _ in range(1200):  # up to a minute on a loaded machine
        if server.started:
            return server, thread, port
        time.sleep(0.05)
    raise RuntimeError("server did not start")


@pytest.fixture(scope="module", params=["batched", "per-request"])
def server(bundle, request):
    """The server both ways: continuous batching (CPU bundles) and a generator per request (other targets)."""
    from slmops.shipping.serve import ServeOptions, create_app

    options = ServeOptions(api_key=KEY, max_body_bytes=4096, max_tokens_limit=64, batching=request.param == "batched")
    srv, thread, port = _start(create_app(bundle, options))
    yield port
    srv.should_exit = True
    thread.join(timeout=10)


@pytest.fixture
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=f"http://127.0.0.1:{server}/v1", api_key=KEY, max_retries=0)


def raw(port, method, path, body=None, headers=None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
    conn.request(
        method,
        path,
        body=data,
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {KEY}", **(headers or {})},
    )
    response = conn.getresponse()
    return response.status, json.loads(response.read() or b"null")


def test_models_lists_base_and_adapters(client):
    assert [m.id for m in client.models.list().data] == ["base", "qv"]


def test_chat_completion_per_adapter(client):
    replies = {}
    for model in ("base", "qv"):
        r = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "hello"}], max_tokens=8, temperature=1.0, seed=3
        )
        assert r.model == model and r.choices[0].finish_reason in ("stop", "length")
        assert r.usage.completion_tokens <= 8 and r.usage.prompt_tokens > 0
        replies[model] = r.choices[0].message.content
    again = client.chat.completions.create(
        model="qv", messages=[{"role": "user", "content": "hello"}], max_tokens=8, temperature=1.0, seed=3
    )
    assert again.choices[0].message.content == replies["qv"]
    assert replies["qv"] != replies["base"]


def test_streaming_matches_non_streaming(client):
    args = dict(model="qv", messages=[{"role": "user", "content": "tell me"}], max_tokens=10, temperature=0)
    whole = client.chat.completions.create(**args).choices[0].message.content
    pieces, finish = [], None
    for chunk in client.chat.completions.create(**args, stream=True):
        if chunk.choices and chunk.choices[0].delta.content:
            pieces.append(chunk.choices[0].delta.content)
        if chunk.choices and chunk.choices[0].finish_reason:
            finish = chunk.choices[0].finish_reason
    assert "".join(pieces) == whole and finish in ("stop", "length")


def test_completions_endpoint_and_stop(client):
    r = client.completions.create(model="base", prompt="the sea", max_tokens=12, temperature=0)
    text = r.choices[0].text
    assert r.object == "text_completion" and r.usage.completion_tokens >= 1
    if len(text) > 3:
        cut = client.completions.create(model="base", prompt="the sea", max_tokens=12, temperature=0, stop=[text[1:3]])
        assert cut.choices[0].finish_reason == "stop" and text.startswith(cut.choices[0].text)


def test_concurrent_requests_for_different_adapters_do_not_mix(client):
    from concurrent.futures import ThreadPoolExecutor

    def ask(model):
        return (
            client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=6, temperature=0
            )
            .choices[0]
            .message.content
        )

    expected = {m: ask(m) for m in ("base", "qv")}
    with ThreadPoolExecutor(6) as pool:
        got = list(pool.map(ask, ["base", "qv"] * 6))
    assert got == [expected["base"], expected["qv"]] * 6


@pytest.mark.parametrize(
    "body,status,code_or_text",
    [
        (b"{not json", 400, "request body is not valid JSON"),
        ({"model": "nope", "messages": [{"role": "user", "content": "x"}]}, 404, "model_not_found"),
        ({"model": "base", "messages": []}, 400, "messages"),
        (
            {"model": "base", "messages": [{"role": "user", "content": "x"}], "max_tokens": 1000},
            400,
            "max_tokens 1000 is above this server's limit of 64",
        ),
        ({"model": "base", "messages": [{"role": "user", "content": "x" * 5000}]}, 413, "request_too_large"),
    ],
)
def test_bad_requests_get_openai_errors(server, body, status, code_or_text):
    got_status, payload = raw(server, "POST", "/v1/chat/completions", body)
    assert got_status == status
    error = payload["error"]
    assert code_or_text in (error["code"] or "") or code_or_text in error["message"] or code_or_text == error["param"]
    assert "Traceback" not in json.dumps(payload)


def test_api_key_is_required(server):
    status, payload = raw(server, "GET", "/v1/models", headers={"Authorization": "Bearer wrong"})
    assert status == 401 and payload["error"]["code"] == "invalid_api_key"
    status, payload = raw(
        server, "POST", "/v1/chat/completions", {"model": "base", "messages": []}, headers={"Authorization": ""}
    )
    assert status == 401 and payload["error"]["message"].startswith("missing or wrong API key")
    assert raw(server, "GET", "/health", headers={"Authorization": ""})[0] == 200


@pytest.mark.parametrize("batching", [True, False])
def test_full_queue_answers_503(bundle, batching):
    from slmops.shipping.serve import ServeOptions, create_app

    options = ServeOptions(batching=batching, max_batch=1, workers=1, max_queue=0)
    srv, thread, port = _start(create_app(bundle, options))
    try:
        from concurrent.futures import ThreadPoolExecutor

        body = {"model": "base", "messages": [{"role": "user", "content": "x"}], "max_tokens": 200}
        with ThreadPoolExecutor(8) as pool:
            statuses = [s for s, _ in pool.map(lambda _: raw(port, "POST", "/v1/chat/completions", body), range(8))]
        assert 200 in statuses and 503 in statuses
    finally:
        srv.should_exit = True
        thread.join(timeout=10)


ADMIN = "admin-key"


@pytest.fixture(scope="module")
def admin_server(bundle):
    """A server that loads adapters at run time from the folder holding the bundle and the adapters."""
    from slmops.shipping.serve import ServeOptions, create_app

    options = ServeOptions(admin_key=ADMIN, adapter_dirs=(bundle.parent,), max_batch=4)
    srv, thread, port = _start(create_app(bundle, options))
    yield port
    srv.should_exit = True
    thread.join(timeout=10)


def _ask(port, model, prompt="tell me", max_tokens=12, **extra):
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens}
    return raw(port, "POST", "/v1/chat/completions", {"temperature": 0, **body, **extra})


def _admin(port, method, path, body=None, key=ADMIN):
    return raw(port, method, path, body, headers={"Authorization": f"Bearer {key}"})


def test_adapters_load_and_unload_at_run_time(admin_server, bundle):
    port = admin_server
    expected = _ask(port, "qv")[1]["choices"][0]["message"]["content"]
    for name, path in (("fresh", bundle.parent / "qv-adapter"), ("copy", bundle / "adapters" / "qv.onnx_adapter")):
        start = time.perf_counter()
        status, body = _admin(port, "POST", "/v1/adapters", {"name": name, "path": str(path)})
        assert status == 200, body
        status, reply = _ask(port, name)
        assert time.perf_counter() - start < 5 and status == 200
        assert reply["choices"][0]["message"]["content"] == expected  # the same weights, the same answer
        assert len(body["sha256"]) == 64
    status, listed = raw(port, "GET", "/v1/models")
    assert [m["id"] for m in listed["data"]] == ["base", "qv", "fresh", "copy"]
    assert _admin(port, "DELETE", "/v1/adapters/fresh")[0] == 200
    assert _ask(port, "fresh")[0] == 404
    assert [m["id"] for m in raw(port, "GET", "/v1/models")[1]["data"]] == ["base", "qv", "copy"]
    assert _ask(port, "qv")[1]["choices"][0]["message"]["content"] == expected
    assert _admin(port, "DELETE", "/v1/adapters/copy")[0] == 200


@pytest.mark.parametrize(
    "body,key,status,text",
    [
        ({"name": "x", "path": "/etc"}, ADMIN, 403, "outside the folders adapters may be loaded from"),
        ({"name": "x", "path": "{root}/../outside"}, ADMIN, 403, "outside the folders"),
        ({"name": "x", "path": "{root}/missing"}, ADMIN, 400, "does not exist"),
        (
            {"name": "x", "path": "{root}/bundle/README.md"},
            ADMIN,
            400,
            "neither a PEFT adapter folder nor an .onnx_adapter",
        ),
        ({"name": "qv", "path": "{root}/qv-adapter"}, ADMIN, 409, "already loaded"),
        ({"name": "base", "path": "{root}/qv-adapter"}, ADMIN, 400, "bad adapter name"),
        ({"name": "../x", "path": "{root}/qv-adapter"}, ADMIN, 400, "bad adapter name"),
        ({"name": "x", "path": "{root}/qv-adapter"}, "wrong", 401, "missing or wrong admin key"),
        ({"name": "x", "path": "{root}/qv-adapter", "extra": 1}, ADMIN, 400, "extra"),
    ],
)
def test_loading_an_adapter_refuses_bad_requests(admin_server, bundle, body, key, status, text):
    body = {k: v.format(root=bundle.parent) if isinstance(v, str) else v for k, v in body.items()}
    got, payload = _admin(admin_server, "POST", "/v1/adapters", body, key=key)
    assert got == status and text in payload["error"]["message"] + (payload["error"]["param"] or "")
    assert [m["id"] for m in raw(admin_server, "GET", "/v1/models")[1]["data"]] == ["base", "qv"]


def test_a_broken_adapter_file_is_refused(admin_server, bundle, tmp_path_factory):
    broken = bundle.parent / "broken.onnx_adapter"
    broken.write_bytes(b"not an adapter")
    status, payload = _admin(admin_server, "POST", "/v1/adapters", {"name": "broken", "path": str(broken)})
    assert status in (400, 500) and "Traceback" not in json.dumps(payload)
    assert "broken" not in [m["id"] for m in raw(admin_server, "GET", "/v1/models")[1]["data"]]


def test_adapters_are_off_without_an_admin_key(server, bundle):
    status, payload = _admin(server, "POST", "/v1/adapters", {"name": "x", "path": str(bundle)}, key=KEY)
    assert status == 403 and "--admin-key" in payload["error"]["message"]


def test_an_adapter_in_use_is_not_unloaded(admin_server, bundle):
    port = admin_server
    assert _admin(port, "POST", "/v1/adapters", {"name": "busy", "path": str(bundle.parent / "qv-adapter")})[0] == 200
    conn = _open_stream(port, "busy", max_tokens=400)
    try:
        status, payload = _admin(port, "DELETE", "/v1/adapters/busy")
        assert status == 409 and payload["error"]["code"] == "in_use"
    finally:
        conn.close()
    deadline = time.monotonic() + 10
    while _admin(port, "DELETE", "/v1/adapters/busy")[0] != 200:  # once the cancelled request has left
        assert time.monotonic() < deadline
        time.sleep(0.05)


def _open_stream(port, model, max_tokens, prompt="tell me"):
    """A streaming request whose first chunk has arrived: the generation is running."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    body = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
    }
    conn.request("POST", "/v1/chat/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.status == 200
    assert response.readline().startswith(b"data: ")
    conn.response = response  # type: ignore[attr-defined]
    return conn


def _metrics(port) -> dict[str, float]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line[:1] != "#"}


def test_metrics_in_prometheus_text_format(admin_server):
    before = _metrics(admin_server)
    status, reply = _ask(admin_server, "qv", max_tokens=5)
    after = _metrics(admin_server)
    key = 'slmops_requests_total{model="qv",status="200"}'
    assert after[key] == before.get(key, 0) + 1
    assert (
        after["slmops_generated_tokens_total"] - before["slmops_generated_tokens_total"]
        == (reply["usage"]["completion_tokens"])
    )
    assert after["slmops_time_to_first_token_seconds_count"] == before["slmops_time_to_first_token_seconds_count"] + 1
    assert after['slmops_inter_token_latency_seconds_bucket{le="+Inf"}'] >= reply["usage"]["completion_tokens"] - 1
    assert {"slmops_queue_depth", "slmops_batch_size"} <= set(after)


def _long_prompt(port) -> str:
    """A prompt whose greedy reply on the tiny model runs to 400 tokens (no end of sequence on the way)."""
    for prompt in ("tell me", "the sea", "a b c", "hello", "x y z", "one two three"):
        if _ask(port, "qv", prompt=prompt, max_tokens=400)[1]["choices"][0]["finish_reason"] == "length":
            return prompt
    pytest.fail("no prompt runs to 400 tokens on the tiny model")


@pytest.mark.parametrize("stream", [True, False])
def test_a_client_that_disconnects_stops_its_generation(admin_server, monkeypatch, stream):
    from slmops.shipping.batching import BatchModel

    port = admin_server
    prompt = _long_prompt(port)
    run = BatchModel.run

    def slow_run(self, *args, **kwargs):  # 400 tokens take 2 s: the disconnect lands mid-generation
        time.sleep(0.005)
        return run(self, *args, **kwargs)

    monkeypatch.setattr(BatchModel, "run", slow_run)
    before = _metrics(port)
    if stream:
        _open_stream(port, "qv", max_tokens=400, prompt=prompt).close()
    else:  # the whole reply is awaited: the server polls the connection meanwhile
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        body = {"model": "qv", "messages": [{"role": "user", "content": prompt}], "max_tokens": 400, "temperature": 0}
        conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
        time.sleep(0.3)
        conn.close()
    key = 'slmops_requests_total{model="qv",status="cancelled"}'
    deadline = time.monotonic() + 10
    while True:
        after = _metrics(port)
        if after.get(key, 0) > before.get(key, 0) and after["slmops_batch_size"] == 0:
            break
        assert time.monotonic() < deadline, "the server did not notice the client left"
        time.sleep(0.02)
    assert after["slmops_generated_tokens_total"] - before["slmops_generated_tokens_total"] < 400


def test_sigterm_finishes_the_running_request_and_exits_cleanly(bundle, tmp_path):
    import os
    import signal
    import subprocess
    import sys

    port = _free_port()
    log = (tmp_path / "serve.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "slmops.cli", "serve", str(bundle), "--port", str(port), "--threads", "1"],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if raw(port, "GET", "/health")[0] == 200:
                    break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "serve.log").read_text()
                time.sleep(0.2)
        prompt = _long_prompt(port)
        conn = _open_stream(port, "qv", max_tokens=400, prompt=prompt)
        proc.send_signal(signal.SIGTERM)
        rest = conn.response.read().decode()  # type: ignore[attr-defined]
        assert rest.rstrip().endswith("data: [DONE]") and '"finish_reason": "length"' in rest
        assert proc.wait(timeout=60) == 0, (tmp_path / "serve.log").read_text()
        with pytest.raises(OSError):
            raw(port, "GET", "/health")
        assert "Traceback" not in (tmp_path / "serve.log").read_text()
    finally:
        proc.kill()


@pytest.mark.slow  # a server process, single-stream decode, a short load and its serial check
def test_load_script_reports_json(bundle, tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).parent.parent / "scripts" / "load_serve.py"
    out = tmp_path / "load.json"
    args = [str(bundle), "--clients", "4", "--seconds", "4", "--max-tokens", "8", "--check", "6", "--json", str(out)]
    result = subprocess.run(
        [sys.executable, str(script), *args, "--hot-load", f"hot={bundle.parent / 'qv-adapter'}"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(out.read_text())
    assert report["errors"] == 0 and report["requests"] > 0 and report["replies_differing_from_serial"] == 0
    assert report["generated_tok_s"] > 0 and report["ratio_to_fastest_single_stream"] > 0
    assert set(report["single_stream_decode_tok_s"]) == {"base", "qv"} and report["models"] == ["qv"]
    assert report["hot_load"]["loaded"] and report["hot_load"]["replies_differing_from_serial"] == 0
    assert report["server"]["decode"]["steps"] > 0
