"""Prometheus text exposition (format 0.0.4) of the server's counters, gauges and histograms."""
from __future__ import annotations

import threading

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0)
TPOT_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0)
E2E_BUCKETS = (0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0)


class Histogram:
    def __init__(self, name: str, doc: str, buckets: tuple[float, ...]):
        self.name, self.doc, self.buckets = name, doc, buckets
        self.counts = [0] * len(buckets)
        self.sum = 0.0
        self.count = 0

    def observe(self, v: float) -> None:
        for i, b in enumerate(self.buckets):
            if v <= b:
                self.counts[i] += 1
        self.sum += v
        self.count += 1

    def render(self, labels: str) -> list[str]:
        out = [f"# HELP {self.name} {self.doc}", f"# TYPE {self.name} histogram"]
        for b, c in zip(self.buckets, self.counts):
            out.append(f'{self.name}_bucket{{{labels},le="{b}"}} {c}')
        out.append(f'{self.name}_bucket{{{labels},le="+Inf"}} {self.count}')
        out.append(f"{self.name}_sum{{{labels}}} {self.sum}")
        out.append(f"{self.name}_count{{{labels}}} {self.count}")
        return out


class Metrics:
    """Updated from the event loop (request side) and read by /metrics; a lock keeps renders whole."""

    def __init__(self, model_name: str):
        self.labels = f'model_name="{model_name}"'
        self.lock = threading.Lock()
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.finished: dict[str, int] = {}
        self.rejected: dict[str, int] = {}
        self.ttft = Histogram("dayzero:time_to_first_token_seconds", "Time to first token.", TTFT_BUCKETS)
        self.tpot = Histogram("dayzero:time_per_output_token_seconds", "Time per output token after the first.",
                              TPOT_BUCKETS)
        self.e2e = Histogram("dayzero:e2e_request_latency_seconds", "End-to-end request latency.", E2E_BUCKETS)

    def request_done(self, prompt_tokens: int, gen_tokens: int, reason: str, ttft: float | None,
                     tpot: float | None, e2e: float) -> None:
        with self.lock:
            self.prompt_tokens += prompt_tokens
            self.generation_tokens += gen_tokens
            self.finished[reason] = self.finished.get(reason, 0) + 1
            if ttft is not None:
                self.ttft.observe(ttft)
            if tpot is not None:
                self.tpot.observe(tpot)
            self.e2e.observe(e2e)

    def reject(self, status: int) -> None:
        with self.lock:
            self.rejected[str(status)] = self.rejected.get(str(status), 0) + 1

    def render(self, stats: dict, in_flight: int) -> str:
        L = self.labels

        def gauge(name, doc, v):
            return [f"# HELP {name} {doc}", f"# TYPE {name} gauge", f"{name}{{{L}}} {v}"]

        def counter(name, doc, v):
            return [f"# HELP {name} {doc}", f"# TYPE {name} counter", f"{name}{{{L}}} {v}"]

        with self.lock:
            out = gauge("dayzero:num_requests_running", "Requests in the engine's running batch.",
                        stats.get("running", 0))
            out += gauge("dayzero:num_requests_waiting", "Requests waiting for the engine.", stats.get("waiting", 0))
            out += gauge("dayzero:num_requests_in_flight", "Requests the server is answering.", in_flight)
            out += gauge("dayzero:kv_cache_usage_perc", "Fraction of KV cache blocks in use (0-1).",
                         stats.get("kv_usage", 0.0))
            out += counter("dayzero:prompt_tokens_total", "Prompt tokens of finished requests.", self.prompt_tokens)
            out += counter("dayzero:generation_tokens_total", "Generated tokens of finished requests.",
                           self.generation_tokens)
            out += counter("dayzero:prefix_cache_hits_total", "Prompt tokens served from the prefix cache.",
                           stats.get("prefix_cache_hit_tokens", 0))
            out += counter("dayzero:prefix_cache_queries_total", "Prompt tokens looked up in the prefix cache.",
                           stats.get("prefix_cache_query_tokens", 0))
            out += counter("dayzero:num_preemptions_total", "Requests preempted for cache space.",
                           stats.get("preemptions", 0))
            # speculative decoding (vLLM's spec_decode counters; engine/drafter.py)
            out += counter("dayzero:spec_decode_num_drafts_total", "Request-steps that verified draft tokens.",
                           stats.get("spec_verify_steps", 0))
            out += counter("dayzero:spec_decode_num_draft_tokens_total", "Draft tokens verified.",
                           stats.get("spec_draft_tokens", 0))
            out += counter("dayzero:spec_decode_num_accepted_tokens_total", "Draft tokens accepted.",
                           stats.get("spec_accepted_tokens", 0))
            out += gauge("dayzero:spec_decode_acceptance_rate", "Accepted / verified draft tokens (0 before any).",
                         stats.get("spec_acceptance") or 0.0)
            out += gauge("dayzero:spec_decode_mean_accepted_length",
                         "Accepted draft tokens per verifying request-step (0 before any).",
                         stats.get("spec_mean_accepted_length") or 0.0)
            out += gauge("dayzero:spec_decode_mean_draft_length",
                         "Draft tokens the draft policy chose to verify per request-step with a proposal "
                         "(0 before any; engine/draft_policy.py).",
                         stats.get("spec_mean_draft_length") or 0.0)
            out += ["# HELP dayzero:request_success_total Finished requests by finish reason.",
                    "# TYPE dayzero:request_success_total counter"]
            out += [f'dayzero:request_success_total{{{L},finished_reason="{k}"}} {v}'
                    for k, v in sorted(self.finished.items())]
            out += ["# HELP dayzero:request_rejected_total Requests refused by a limit, by HTTP status.",
                    "# TYPE dayzero:request_rejected_total counter"]
            out += [f'dayzero:request_rejected_total{{{L},status="{k}"}} {v}' for k, v in sorted(self.rejected.items())]
            for h in (self.ttft, self.tpot, self.e2e):
                out += h.render(L)
        return "\n".join(out) + "\n"
