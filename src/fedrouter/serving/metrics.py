"""The counters behind GET /metrics, in Prometheus' text format: batches and how mixed they were, rows per
adapter, tokens, generation time, responses by path and status. Updated from the event loop (responses)
and the batcher's worker thread (batches), hence the lock."""

from __future__ import annotations

import threading


class Metrics:
    """Counters for /metrics (Prometheus text format); updated from both threads."""

    def __init__(self):
        self.lock = threading.Lock()
        self.responses: dict[tuple[str, int], int] = {}
        self.batches = self.rows = self.mixed_batches = self.routed_rows = 0
        self.max_rows = self.max_adapters = 0
        self.prompt_tokens = self.completion_tokens = 0
        self.generate_seconds = 0.0
        self.adapter_rows: dict[str, int] = {}

    def response(self, path: str, status: int) -> None:
        with self.lock:
            self.responses[(path, status)] = self.responses.get((path, status), 0) + 1

    def batch(self, jobs: list, seconds: float, completion_tokens: int) -> None:
        adapters = {j.adapter for j in jobs}
        with self.lock:
            self.batches += 1
            self.rows += len(jobs)
            self.mixed_batches += len(adapters) > 1
            self.max_rows = max(self.max_rows, len(jobs))
            self.max_adapters = max(self.max_adapters, len(adapters))
            self.routed_rows += sum(j.via_router for j in jobs)
            self.prompt_tokens += sum(len(j.prompt_ids) for j in jobs)
            self.completion_tokens += completion_tokens
            self.generate_seconds += seconds
            for j in jobs:
                self.adapter_rows[j.adapter] = self.adapter_rows.get(j.adapter, 0) + 1

    def text(self, queued: int) -> str:
        def esc(value: str) -> str:
            return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")

        with self.lock:
            lines = [
                "# TYPE fedrouter_batches_total counter", f"fedrouter_batches_total {self.batches}",
                "# TYPE fedrouter_batch_rows_total counter", f"fedrouter_batch_rows_total {self.rows}",
                "# HELP fedrouter_mixed_batches_total batches whose rows used two or more adapters",
                "# TYPE fedrouter_mixed_batches_total counter", f"fedrouter_mixed_batches_total {self.mixed_batches}",
                "# TYPE fedrouter_batch_rows_max gauge", f"fedrouter_batch_rows_max {self.max_rows}",
                "# TYPE fedrouter_batch_adapters_max gauge", f"fedrouter_batch_adapters_max {self.max_adapters}",
                "# TYPE fedrouter_routed_rows_total counter", f"fedrouter_routed_rows_total {self.routed_rows}",
                "# TYPE fedrouter_prompt_tokens_total counter", f"fedrouter_prompt_tokens_total {self.prompt_tokens}",
                "# TYPE fedrouter_completion_tokens_total counter", f"fedrouter_completion_tokens_total {self.completion_tokens}",
                "# TYPE fedrouter_generate_seconds_total counter", f"fedrouter_generate_seconds_total {self.generate_seconds:.6f}",
                "# TYPE fedrouter_queued_requests gauge", f"fedrouter_queued_requests {queued}",
                "# TYPE fedrouter_adapter_rows_total counter",
                *(f'fedrouter_adapter_rows_total{{adapter="{esc(a)}"}} {n}' for a, n in sorted(self.adapter_rows.items())),
                "# TYPE fedrouter_http_responses_total counter",
                *(f'fedrouter_http_responses_total{{path="{esc(p)}",status="{s}"}} {n}'
                  for (p, s), n in sorted(self.responses.items())),
            ]
        return "\n".join(lines) + "\n"
