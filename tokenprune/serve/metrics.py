"""Server counters, exposed at ``GET /metrics`` in the Prometheus text format."""

from __future__ import annotations

import threading
from collections import Counter


class Metrics:
    """Thread-safe counters: requests by status, batches, visual tokens in and kept, tokens generated,
    and the prefill and decode seconds of the batches."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: Counter[int] = Counter()
        self.totals: Counter[str] = Counter()

    def request(self, status: int) -> None:
        with self._lock:
            self.requests[status] += 1

    def batch(
        self, *, size: int, visual: int, kept: int, prefill_s: float, decode_s: float, generated: int
    ) -> None:
        with self._lock:
            self.totals.update(
                {
                    "batches": 1,
                    "batched_requests": size,
                    "visual_tokens_in": visual,
                    "visual_tokens_kept": kept,
                    "generated_tokens": generated,
                    "prefill_seconds": prefill_s,
                    "decode_seconds": decode_s,
                }
            )

    def render(self) -> str:
        """The counters in the Prometheus text exposition format."""
        with self._lock:
            lines = [
                "# HELP tokenprune_requests_total Chat completion requests answered, by HTTP status.",
                "# TYPE tokenprune_requests_total counter",
            ]
            lines += [
                f'tokenprune_requests_total{{status="{s}"}} {n}' for s, n in sorted(self.requests.items())
            ]
            for name in (
                "batches",
                "batched_requests",
                "visual_tokens_in",
                "visual_tokens_kept",
                "generated_tokens",
                "prefill_seconds",
                "decode_seconds",
            ):
                lines += [
                    f"# TYPE tokenprune_{name}_total counter",
                    f"tokenprune_{name}_total {self.totals[name]}",
                ]
        return "\n".join(lines) + "\n"
