"""Machines of a multi-node fine-tune checking in with machine 0, before and while they train.

Machine 0 serves a small line-of-JSON service at the main address; every machine (0 included) is its
client. Before launching, each joins with what it is about to train (recipe, data and model hashes,
the checkpoint it would resume from); machine 0 compares them and answers every machine with the same
verdict, so a mismatch stops all of them before any training step. While training, each checks in
every few seconds: the answer says whether another machine failed, or has gone silent for longer
than the timeout (machine 0 keeps the clock, so clocks need not agree). A machine that cannot reach
machine 0 for that long stops too. torch's TCPStore would do the transport, but it prints C++ stack
traces on a refused connection, and a refusal here must be one line.
"""

from __future__ import annotations

import json
import socket
import socketserver
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Optional

from slmops.core.errors import RunError

BEAT_SECONDS = 2.0  # how often a training machine checks in


def silence_limit(timeout: float) -> float:
    """How long a machine may be silent before it counts as gone: the timeout less two check-ins, so that
    noticing it and stopping still fit in the timeout."""
    return max(timeout - 2 * BEAT_SECONDS, BEAT_SECONDS)


@dataclass
class _State:
    machines: int
    timeout: float
    joined: dict[int, dict] = field(default_factory=dict)
    verdict: Optional[str] = None  # "" once every identity matched
    last_seen: dict[int, float] = field(default_factory=dict)
    failure: Optional[str] = None  # the first failure reported, as the line every machine prints
    finished: set[int] = field(default_factory=set)  # done, or stopped because of another's failure
    lock: threading.Condition = field(default_factory=threading.Condition)


class Server(socketserver.ThreadingTCPServer):
    """Machine 0's side: runs in a thread of machine 0's `slmops finetune` for the whole run."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, host: str, port: int, machines: int, timeout: float):
        self.state = _State(machines, timeout)
        super().__init__((host, port), _Handler)
        self.thread = threading.Thread(target=self.serve_forever, name="slmops-checkin", daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.shutdown()
        self.server_close()

    def wait_finished(self) -> None:
        """Keep serving until every other machine is done, has left or has gone silent (at most the timeout),
        so that none loses machine 0 before it has heard how the run ended."""
        s = self.state

        def settled() -> bool:
            now = time.monotonic()
            return all(
                r in s.finished or now - s.last_seen.get(r, now - s.timeout - 1) > silence_limit(s.timeout)
                for r in range(1, s.machines)
            )

        deadline = time.monotonic() + s.timeout
        with s.lock:
            while not settled() and time.monotonic() < deadline:
                s.lock.wait(timeout=1.0)


class _Handler(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        request = json.loads(self.rfile.readline())
        reply = _answer(self.server.state, request)  # type: ignore[attr-defined]
        self.wfile.write((json.dumps(reply) + "\n").encode())


def _answer(s: _State, request: dict) -> dict:
    rank, op = int(request["rank"]), request["op"]
    with s.lock:
        s.last_seen[rank] = time.monotonic()
        if op == "join":
            s.joined[rank] = request["identity"]
            if len(s.joined) == s.machines:
                s.verdict = _compare(s.joined)
                s.lock.notify_all()
            done = s.lock.wait_for(lambda: s.verdict is not None, timeout=s.timeout)
            if not done:
                missing = sorted(set(range(s.machines)) - set(s.joined))
                s.verdict = (
                    f"machine(s) {', '.join(map(str, missing))} did not check in within {s.timeout:g} s; "
                    "start every machine with the same --main-address"
                )
                s.lock.notify_all()
            return {"stop": s.verdict or None}
        if op == "fail":
            if s.failure is None:
                s.failure = f"machine {rank} failed: {request['reason']}"
            s.finished.add(rank)
        elif op in ("done", "leave"):
            s.finished.add(rank)
        s.lock.notify_all()
        return {"stop": s.failure or _silent(s)}


def _silent(s: _State) -> Optional[str]:
    now = time.monotonic()
    for rank in range(s.machines):
        if rank in s.finished:
            continue
        quiet = now - s.last_seen.get(rank, now)
        if quiet > silence_limit(s.timeout):
            return (
                f"machine {rank} stopped answering ({quiet:.0f} s without a check-in; distributed.timeout "
                f"{s.timeout:g} s): it was killed, or its network went down"
            )
    return None


def _compare(joined: dict[int, dict]) -> str:
    """'' if every machine is about to train the same thing, else the line that says which differs."""
    labels = {
        "recipe": "recipe",
        "data": "data (sha256)",
        "model": "model weights (fingerprint)",
        "checkpoint": "checkpoint to resume from",
    }
    first = joined[0]
    for rank in sorted(joined)[1:]:
        for key, label in labels.items():
            if joined[rank].get(key) != first.get(key):
                return (
                    f"machine {rank}'s {label} differs from machine 0's ({_short(joined[rank].get(key))} against "
                    f"{_short(first.get(key))}); run every machine with the same recipe, flags, data and model"
                )
    return ""


def _short(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    return text if len(text) <= 24 else text[:12] + "..."


class Client:
    """One machine's side (machine 0's too)."""

    def __init__(self, host: str, port: int, rank: int, timeout: float):
        self.host, self.port, self.rank, self.timeout = host, port, rank, timeout
        self.last_answer = time.monotonic()

    def join(self, identity: dict) -> None:
        """Check in before training; RunError (the same line on every machine) unless all match."""
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                reply = self._ask({"op": "join", "identity": identity}, wait=self.timeout + 10)
                break
            except OSError as exc:
                if time.monotonic() > deadline:
                    raise RunError(
                        f"machine {self.rank} cannot reach machine 0 at {self.host}:{self.port} within "
                        f"{self.timeout:g} s ({exc.strerror or exc}); check --main-address and that machine 0 is "
                        "running"
                    ) from None
                time.sleep(1.0)
        self.last_answer = time.monotonic()
        if reply["stop"]:
            raise RunError(reply["stop"])

    def check(self, op: str = "beat", reason: str = "") -> Optional[str]:
        """Check in; the line to stop with, if another machine failed or went silent (or machine 0 is gone)."""
        try:
            reply = self._ask({"op": op, "reason": reason}, wait=min(10.0, silence_limit(self.timeout)))
        except OSError as exc:
            quiet = time.monotonic() - self.last_answer
            if quiet > silence_limit(self.timeout):
                return (
                    f"machine 0 at {self.host}:{self.port} stopped answering ({quiet:.0f} s; distributed.timeout "
                    f"{self.timeout:g} s, {exc.strerror or exc}): it was killed, or its network went down"
                )
            return None
        self.last_answer = time.monotonic()
        return reply["stop"]

    def _ask(self, request: dict, wait: float) -> dict:
        with socket.create_connection((self.host, self.port), timeout=min(wait, 10)) as conn:
            conn.settimeout(wait)
            conn.sendall((json.dumps({**request, "rank": self.rank}) + "\n").encode())
            line = conn.makefile().readline()
        if not line:
            raise ConnectionResetError("machine 0 closed the connection")
        return json.loads(line)
