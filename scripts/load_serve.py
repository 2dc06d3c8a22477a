#!/usr/bin/env python
"""Load test for `slmops serve`: many streaming OpenAI clients against a real bundle, as JSON.

    python scripts/load_serve.py BUNDLE [--clients 32] [--seconds 60] [--max-tokens 64]
        [--hot-load NAME=PATH]

In one run:
1. starts `slmops serve BUNDLE` in its own process on a free loopback port;
2. measures single-stream decode of the same bundle with onnxruntime-genai (`slmops generate`'s
   path), for the base and for each adapter, while the server idles;
3. runs the clients (official `openai` client, streaming, greedy, models spread evenly over the
   bundle's adapters, every question different: only the chat template's system prompt is
   shared) for the given time; halfway, POSTs the hot-load adapter and times its first token
   from the POST;
4. asks a spread sample of the questions again, one at a time, for the serial greedy reference;
5. prints req/s, generated tok/s and its ratio to single-stream decode, TTFT and inter-token
   p50/p95, errors, where the server's time went, and how many replies differ from serial.
Exit status 1 if any request failed or any greedy reply differs.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

PROMPTS = [
    "Give me one tip for staying focused.",
    "What is the capital of France?",
    "Write a haiku about rain.",
    "Explain what a LoRA adapter is in one sentence.",
    "List three fruits.",
    "How do I boil an egg?",
    "Name a famous painter.",
    "Why is the sky blue?",
]
ADMIN = "load-test-admin"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument(
        "--prompts",
        choices=["unique", "repeat"],
        default="unique",
        help="unique: every request a new question (only the system prompt is shared); repeat: each client "
        "asks its own question again and again (the load script's workload before continuous batching).",
    )
    ap.add_argument("--check", type=int, default=64, help="Replies to ask again alone, for the serial reference.")
    ap.add_argument("--hot-load", default=None, help="NAME=PATH: an adapter to POST halfway through.")
    ap.add_argument("--serve-args", default="", help="Extra `slmops serve` options, e.g. '--max-batch 16'.")
    ap.add_argument("--json", type=Path, default=None, help="Also write the result here.")
    args = ap.parse_args()

    from openai import OpenAI

    hot_name, hot_path = args.hot_load.split("=", 1) if args.hot_load else (None, None)
    port = _free_port()
    dirs = ["--adapter-dir", str(Path(hot_path).resolve().parent)] if hot_path else []
    server = subprocess.Popen(
        [sys.executable, "-m", "slmops.cli", "serve", str(args.bundle), "--port", str(port)]
        + ["--admin-key", ADMIN, "--max-queue", str(args.clients), *dirs, *args.serve_args.split()],
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=300)
        _wait_ready(client, server)
        models = [m.id for m in client.models.list().data]
        mix = [m for m in models if m != "base"] or ["base"]
        single = single_stream(args.bundle, models, args.max_tokens)
        before = server_metrics(port)
        result = load(client, port, mix, args, hot_name, hot_path)
        result["server"] = server_view(before, server_metrics(port), result["wall"])
        # the serial reference: a spread sample of the replies, each asked again alone
        replies = result.pop("replies")
        sample = replies[:: max(1, len(replies) // args.check)]
        result["replies_checked"] = len(sample)
        result["replies_differing_from_serial"] = sum(
            _stream(client, model, prompt, args.max_tokens)["text"] != text for model, prompt, text in sample
        )
        if hot_name and result["hot_load"].get("loaded"):
            hot = result["hot_load"]
            hot["replies_differing_from_serial"] = sum(
                _stream(client, hot_name, p, args.max_tokens)["text"] != t for p, t in hot.pop("replies")
            )
    finally:
        server.terminate()
        server.wait(timeout=60)
    fastest = max(single.values())
    out = {
        "bundle": str(args.bundle),
        "clients": args.clients,
        "seconds": round(result["wall"], 1),
        "max_tokens": args.max_tokens,
        "prompts": args.prompts,
        "models": mix,
        "single_stream_decode_tok_s": single,
        **{k: v for k, v in result.items() if k != "wall"},
        "ratio_to_fastest_single_stream": round(result["generated_tok_s"] / fastest, 2),
    }
    text = json.dumps(out, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    bad = out["errors"] or out["replies_differing_from_serial"]
    bad = bad or out.get("hot_load", {}).get("replies_differing_from_serial")
    return 1 if bad else 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_ready(client, server: subprocess.Popen) -> None:
    deadline = time.monotonic() + 300
    while True:
        try:
            client.models.list()
            return
        except Exception:
            if server.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("the server did not start") from None
            time.sleep(0.3)


def single_stream(bundle: Path, models: list[str], max_tokens: int) -> dict[str, float]:
    """Decode tok/s of one stream on onnxruntime-genai, per model, over the prompts (after a warm-up)."""
    from slmops.shipping.runtime import Runtime, Sampling

    runtime = Runtime(bundle)
    out = {}
    for model in models:
        adapter = None if model == "base" else model
        tokens = seconds = 0.0
        runtime.generate(runtime.chat_prompt([{"role": "user", "content": PROMPTS[0]}]), adapter)  # warm-up
        for prompt in PROMPTS:
            done = runtime.generate(
                runtime.chat_prompt([{"role": "user", "content": prompt}]), adapter, Sampling(max_new_tokens=max_tokens)
            )
            tokens += done.completion_tokens - 1
            seconds += done.seconds - (done.first_token_seconds or 0.0)
        out[model] = round(tokens / seconds, 1)
    return out


def _stream(client, model: str, prompt: str, max_tokens: int) -> dict:
    """One streaming greedy request: its text, TTFT, gaps between chunks, tokens."""
    start = time.perf_counter()
    stamps, pieces, usage = [], [], None
    stream = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": prompt}],
        max_tokens=max_tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            stamps.append(time.perf_counter())
            pieces.append(chunk.choices[0].delta.content)
        if chunk.usage:
            usage = chunk.usage
    return {
        "text": "".join(pieces),
        "ttft": (stamps[0] - start) if stamps else None,
        "gaps": [b - a for a, b in zip(stamps, stamps[1:])],
        "tokens": usage.completion_tokens if usage else len(pieces),
    }


def load(client, port: int, mix: list[str], args, hot_name, hot_path) -> dict:
    deadline = time.monotonic() + args.seconds
    done: list[dict] = []
    errors: list[str] = []
    hot: dict = {}
    lock = threading.Lock()

    def worker(i: int) -> None:
        n = i
        while time.monotonic() < deadline:
            question = f"(client {i}, question {n})" if args.prompts == "unique" else f"(client {i})"
            model, prompt = (
                mix[i % len(mix)],
                f"{PROMPTS[(n if args.prompts == 'unique' else i) % len(PROMPTS)]} {question}",
            )
            n += 1
            try:
                reply = _stream(client, model, prompt, args.max_tokens)
                with lock:
                    done.append({**reply, "model": model, "prompt": prompt})
            except Exception as exc:  # counted and reported, never hidden
                with lock:
                    errors.append(f"{type(exc).__name__}: {exc}")

    def hot_loader() -> None:
        import urllib.request

        time.sleep(args.seconds / 2)
        body = json.dumps({"name": hot_name, "path": str(Path(hot_path).resolve())}).encode()
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/adapters",
            data=body,
            headers={"Content-Type": "application/json", "Authorization": f"Bearer {ADMIN}"},
        )
        start = time.perf_counter()
        with urllib.request.urlopen(request, timeout=300) as response:
            hot.update(loaded=True, response=json.loads(response.read()))
        hot["post_seconds"] = round(time.perf_counter() - start, 3)
        first = _stream(client, hot_name, PROMPTS[0], args.max_tokens)  # its TTFT counts from here
        hot["first_token_after_post_seconds"] = round(hot["post_seconds"] + first["ttft"], 3)
        replies = [(PROMPTS[0], first["text"])]
        for prompt in PROMPTS[1:]:
            if time.monotonic() > deadline:
                break
            replies.append((prompt, _stream(client, hot_name, prompt, args.max_tokens)["text"]))
        hot["replies"] = replies

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(args.clients)]
    if hot_name:
        threads.append(threading.Thread(target=hot_loader))
    start = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.monotonic() - start
    ttft = [d["ttft"] for d in done if d["ttft"] is not None]
    gaps = [g for d in done for g in d["gaps"]]
    return {
        "wall": wall,
        "requests": len(done),
        "req_s": round(len(done) / wall, 2),
        "generated_tok_s": round(sum(d["tokens"] for d in done) / wall, 1),
        "ttft_s": {"p50": _q(ttft, 0.5), "p95": _q(ttft, 0.95)},
        "inter_token_s": {"p50": _q(gaps, 0.5), "p95": _q(gaps, 0.95)},
        "errors": len(errors),
        "error_samples": errors[:5],
        "hot_load": hot,
        "replies": [(d["model"], d["prompt"], d["text"]) for d in done],
    }


def server_metrics(port: int) -> dict[str, float]:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=60) as response:
        lines = response.read().decode().splitlines()
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in lines if line[:1] != "#"}


def server_view(before: dict, after: dict, wall: float) -> dict:
    """Where the server's time went during the load: model runs by kind, and rows per decode step."""
    out = {}
    for kind in ("prefill", "decode"):
        steps, seconds, rows = (
            after[f'{m}{{kind="{kind}"}}'] - before.get(f'{m}{{kind="{kind}"}}', 0)
            for m in ("slmops_steps_total", "slmops_step_seconds_total", "slmops_step_rows_total")
        )
        out[kind] = {
            "steps": int(steps),
            "share_of_wall": round(seconds / wall, 3),
            "ms_per_step": round(1000 * seconds / steps, 1) if steps else None,
            "rows_per_step" if kind == "decode" else "tokens_per_step": round(rows / steps, 1) if steps else None,
        }
    return out


def _q(values: list[float], q: float) -> float | None:
    if not values:
        return None
    return round(statistics.quantiles(values, n=100, method="inclusive")[int(q * 100) - 1], 4)


if __name__ == "__main__":
    sys.exit(main())
