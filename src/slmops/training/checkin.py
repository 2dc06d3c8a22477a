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
    """How long a machine may be silent before it counts as gone: half the timeout, so that noticing it,
    stopping the training processes and exiting still fit in the timeout on a loaded machine."""
    return max(timeout / 2, 2 * BEAT_SECONDS)


@dataclass
class _State:
    machines: int
    timeout: float
    joined: dict[int, dict] = field(default_factory=dict)
    verdict: Optional[str] = None  # "" once every identity matched
    resume: Optional[list[str]] = None  # the newest checkpoint every machine has, if any
    last_seen: dict[int, float] = field(default_factory=dict)
    failure: Optional[str] = None  # the first failure reported, as the line every machine prints
    finished: set[int] = field(default_factory=set)  # done, or stopped because of another's failure
    done: set[int] = field(default_factory=set)  # trained to the end
    released: set[int] = field(default_factory=set)  # told that every machine is done, or left: need no answer
    lock: threading.Condition = field(default_factory=threading.Condition)


class Server(socketserver.ThreadingTCPServer):
    """Machine 0's side: runs in a thread of machine 0's `slmops finetune` for the whole run."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, port: int, machines: int, timeout: float):
        self.state = _State(machines, timeout)
        try:  # every interface: the main address may name this machine by an address other than its own view
            super().__init__(("", port), _Handler)
        except OSError as exc:
            raise RunError(
                f"machine 0 cannot listen on port {port} ({exc.strerror or exc}); choose a free port in "
                "--main-address (the launcher also takes the next one)"
            ) from None
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
                r in s.released or now - s.last_seen.get(r, now - s.timeout - 1) > silence_limit(s.timeout)
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
            if len(s.joined) == s.machines and s.verdict is None:
                s.verdict, s.resume = _compare(s.joined), _common_checkpoint(s.joined)
                if not s.verdict and s.resume is None and any(i.get("checkpoints") for i in s.joined.values()):
                    s.verdict = (
                        "no checkpoint is on every machine, so they cannot resume from the same step; "
                        "delete every machine's work folder to start over"
                    )
                now = time.monotonic()
                s.last_seen.update({r: now for r in s.joined})  # waiting for the others is not silence
                s.lock.notify_all()
            done = s.lock.wait_for(lambda: s.verdict is not None, timeout=s.timeout)
            if not done:
                missing = sorted(set(range(s.machines)) - set(s.joined))
                s.verdict = (
                    f"machine(s) {', '.join(map(str, missing))} did not check in within {s.timeout:g} s; "
                    "start every machine with the same --main-address"
                )
                s.lock.notify_all()
            return {"stop": s.verdict or None, "resume": s.resume}
        if op == "fail":
            if s.failure is None:
                s.failure = f"machine {rank} failed: {request['reason']}"
            s.finished.add(rank)
            s.released.add(rank)
        elif op in ("done", "leave"):
            s.finished.add(rank)
            if op == "done":
                s.done.add(rank)
        stop, all_done = s.failure or _silent(s), len(s.done) == s.machines
        if op == "leave" or (op == "done" and (all_done or stop)):
            s.released.add(rank)  # it has its answer: machine 0 may stop serving once all have theirs
        s.lock.notify_all()
        return {"stop": stop, "all_done": all_done}


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
    labels = {"recipe": "recipe", "data": "data (sha256)", "model": "model weights (fingerprint)"}
    first = joined[0]
    for rank in sorted(joined)[1:]:
        for key, label in labels.items():
            if joined[rank].get(key) != first.get(key):
                return (
                    f"machine {rank}'s {label} differs from machine 0's ({_short(joined[rank].get(key))} against "
                    f"{_short(first.get(key))}); run every machine with the same recipe, flags, data and model"
                )
    return ""


def _common_checkpoint(joined: dict[int, dict]) -> Optional[list[str]]:
    """The newest checkpoint (stage folder, step) that every machine has complete, or None."""
    sets = [{(str(c[0]), int(c[1])) for c in identity.get("checkpoints") or []} for identity in joined.values()]
    common: set[tuple[str, int]] = set.intersection(*sets) if sets else set()
    if not common:
        return None
    stage, step = max(common, key=lambda c: checkpoint_order(*c))
    return [stage, str(step)]


def checkpoint_order(stage: str, step: int) -> tuple[bool, int]:
    """Sorts checkpoints by when they were made: SFT's folder (`checkpoints`) before DPO's, then by step."""
    return (stage != "checkpoints", step)


def _short(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    return text if len(text) <= 24 else text[:12] + "..."


class Client:
    """One machine's side (machine 0's too)."""

    def __init__(self, host: str, port: int, rank: int, timeout: float):
        self.host, self.port, self.rank, self.timeout = host, port, rank, timeout
        self.last_answer = time.monotonic()
        self.all_done = False

    def join(self, identity: dict) -> Optional[list[str]]:
        """Check in before training; RunError (the same line on every machine) unless all match.
        Returns the (stage folder, step) every machine resumes from, if they have checkpoints."""
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
        return reply.get("resume")

    def finish(self) -> None:
        """Say this machine trained to the end, and wait (at most the timeout) until every machine has: a
        failure elsewhere after this point still reaches this machine (RunError)."""
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            stop = self.check("done")
            if stop:
                raise RunError(stop)
            if self.all_done:
                return
            time.sleep(0.5)

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
        self.all_done = bool(reply.get("all_done"))
        return reply["stop"]

    def _ask(self, request: dict, wait: float) -> dict:
        with socket.create_connection((self.host, self.port), timeout=min(wait, 10)) as conn:
            conn.settimeout(wait)
            conn.sendall((json.dumps({**request, "rank": self.rank}) + "\n").encode())
            line = conn.makefile().readline()
        if not line:
            raise ConnectionResetError("machine 0 closed the connection")
        return json.loads(line)
