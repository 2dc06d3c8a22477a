"""The server's numbers in Prometheus' text format (version 0.0.4), with no client library.

Counters and gauges take labels; histograms have fixed buckets. Everything is updated from the
scheduler's thread and the event loop, so one lock guards it.
"""

from __future__ import annotations

import threading
from collections import defaultdict

TTFT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0)
INTER_TOKEN_BUCKETS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0)


class Histogram:
    def __init__(self, buckets: tuple[float, ...]):
        self.buckets = buckets
        self.counts = [0] * len(buckets)
        self.total = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[i] += 1
        self.total += value
        self.count += 1

    def lines(self, name: str) -> list[str]:
        out = [f'{name}_bucket{{le="{bound}"}} {count}' for bound, count in zip(self.buckets, self.counts)]
        out.append(f'{name}_bucket{{le="+Inf"}} {self.count}')
        return out + [f"{name}_sum {self.total:.6f}", f"{name}_count {self.count}"]


class Metrics:
    """What `GET /metrics` shows."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, str], int] = defaultdict(int)
        self.generated = 0
        self.gauges = {"queue_depth": 0.0, "batch_size": 0.0}
        self.steps: dict[str, list[float]] = {kind: [0, 0.0, 0] for kind in ("prefill", "decode")}  # n, s, rows
        self.ttft = Histogram(TTFT_BUCKETS)
        self.inter_token = Histogram(INTER_TOKEN_BUCKETS)

    def request(self, model: str, status: str) -> None:
        with self._lock:
            self.requests[(model, status)] += 1

    def observe(self, name: str, value: float) -> None:
        """The scheduler's hook: "ttft" and "inter_token" seconds, "generated" tokens, or a gauge."""
        with self._lock:
            if name == "ttft":
                self.ttft.observe(value)
            elif name == "inter_token":
                self.inter_token.observe(value)
            elif name == "generated":
                self.generated += int(value)
            elif name.endswith("_seconds"):
                step = self.steps[name[: -len("_seconds")]]
                step[0] += 1
                step[1] += value
            elif name.endswith("_rows"):
                self.steps[name[: -len("_rows")]][2] += value
            else:
                self.gauges[name] = value

    def render(self) -> str:
        with self._lock:
            lines = [
                "# HELP slmops_requests_total Requests finished, by model (base or adapter) and status.",
                "# TYPE slmops_requests_total counter",
            ]
            for (model, status), count in sorted(self.requests.items()):
                lines.append(f'slmops_requests_total{{model="{_label(model)}",status="{status}"}} {count}')
            lines += [
                "# HELP slmops_generated_tokens_total Tokens generated.",
                "# TYPE slmops_generated_tokens_total counter",
                f"slmops_generated_tokens_total {self.generated}",
                "# HELP slmops_queue_depth Requests waiting for a row of the batch.",
                "# TYPE slmops_queue_depth gauge",
                f"slmops_queue_depth {self.gauges['queue_depth']:g}",
                "# HELP slmops_batch_size Sequences in the running batch.",
                "# TYPE slmops_batch_size gauge",
                f"slmops_batch_size {self.gauges['batch_size']:g}",
                "# HELP slmops_steps_total Model runs, by kind (prefill: new prompts; decode: one token per row).",
                "# TYPE slmops_steps_total counter",
                *(f'slmops_steps_total{{kind="{k}"}} {v[0]:g}' for k, v in self.steps.items()),
                "# HELP slmops_step_seconds_total Time in model runs, by kind.",
                "# TYPE slmops_step_seconds_total counter",
                *(f'slmops_step_seconds_total{{kind="{k}"}} {v[1]:.6f}' for k, v in self.steps.items()),
                "# HELP slmops_step_rows_total Rows decoded (decode) or prompt tokens fed, padding included (prefill).",
                "# TYPE slmops_step_rows_total counter",
                *(f'slmops_step_rows_total{{kind="{k}"}} {v[2]:g}' for k, v in self.steps.items()),
                "# HELP slmops_time_to_first_token_seconds From a request's arrival to its first token.",
                "# TYPE slmops_time_to_first_token_seconds histogram",
                *self.ttft.lines("slmops_time_to_first_token_seconds"),
                "# HELP slmops_inter_token_latency_seconds Between two tokens of one request.",
                "# TYPE slmops_inter_token_latency_seconds histogram",
                *self.inter_token.lines("slmops_inter_token_latency_seconds"),
            ]
        return "\n".join(lines) + "\n"


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
