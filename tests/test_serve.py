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


@pytest.fixture(scope="module")
def server(bundle):
    from slmops.shipping.serve import ServeOptions, create_app

    srv, thread, port = _start(create_app(bundle, ServeOptions(api_key=KEY, max_body_bytes=4096, max_tokens_limit=64)))
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


def test_full_queue_answers_503(bundle):
    from slmops.shipping.serve import ServeOptions, create_app

    srv, thread, port = _start(create_app(bundle, ServeOptions(workers=1, max_queue=0)))
    try:
        from concurrent.futures import ThreadPoolExecutor

        body = {"model": "base", "messages": [{"role": "user", "content": "x"}], "max_tokens": 200}
        with ThreadPoolExecutor(8) as pool:
            statuses = [s for s, _ in pool.map(lambda _: raw(port, "POST", "/v1/chat/completions", body), range(8))]
        assert 200 in statuses and 503 in statuses
    finally:
        srv.should_exit = True
        thread.join(timeout=10)
