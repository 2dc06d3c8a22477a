#!/usr/bin/env python
"""Load test for `slmops serve`: N concurrent OpenAI clients for a bounded time against a real bundle.

    python scripts/load_serve.py BUNDLE [--clients 32] [--seconds 30] [--max-tokens 32]

Starts the server on a free loopback port, spreads the clients over the base and every adapter,
and reports requests/s, p50/p95 latency, generated tokens/s and errors (which must be 0).
"""

from __future__ import annotations

import argparse
import socket
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--workers", type=int, default=2, help="Server generations at once.")
    args = ap.parse_args()

    import uvicorn
    from openai import OpenAI

    from slmops.core.privacy import go_offline
    from slmops.shipping.serve import ServeOptions, create_app

    go_offline(olive=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(args.bundle, ServeOptions(workers=args.workers, max_queue=args.clients)),
            host="127.0.0.1",
            port=port,
            log_level="warning",
        )
    )
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=300)
    models = [m.id for m in client.models.list().data]
    deadline = time.monotonic() + args.seconds
    latencies, tokens, errors = [], [], []
    lock = threading.Lock()

    def run(i: int) -> None:
        model = models[i % len(models)]
        while time.monotonic() < deadline:
            start = time.monotonic()
            try:
                r = client.chat.completions.create(
                    model=model,
                    max_tokens=args.max_tokens,
                    temperature=0.7,
                    messages=[{"role": "user", "content": f"Give me tip {i}."}],
                )
                with lock:
                    latencies.append(time.monotonic() - start)
                    tokens.append(r.usage.completion_tokens)
            except Exception as exc:  # counted and reported, never hidden
                with lock:
                    errors.append(f"{type(exc).__name__}: {exc}")

    start = time.monotonic()
    with ThreadPoolExecutor(args.clients) as pool:
        list(pool.map(run, range(args.clients)))
    wall = time.monotonic() - start
    server.should_exit = True
    q = statistics.quantiles(latencies, n=20) if len(latencies) >= 2 else [float("nan")] * 19
    print(
        f"{args.clients} clients, {wall:.0f} s, models {', '.join(models)}, max_tokens {args.max_tokens}, "
        f"{args.workers} server workers"
    )
    print(
        f"requests {len(latencies)}  ({len(latencies) / wall:.2f}/s)  p50 {statistics.median(latencies):.2f} s  "
        f"p95 {q[18]:.2f} s  generated {sum(tokens) / wall:.1f} tok/s  errors {len(errors)}"
    )
    for e in errors[:5]:
        print("  error:", e)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
