"""Prometheus metrics of one training process (DESIGN section 6), without extra dependencies.

``MetricsServer(host, port, rank, world_size)`` serves the text exposition format on
``http://host:port/metrics`` from a daemon thread; the training loop calls
:meth:`MetricsServer.update` once per step (a few dict writes, no I/O). Every series has
the label ``rank``. With ``metrics.port: 0`` the loop uses :class:`NullMetrics` instead.
"""

from __future__ import annotations

import bisect
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from preprocess.errors import UserError

__all__ = ["MetricsServer", "NullMetrics", "make_metrics", "SECONDS_BUCKETS"]

SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

# name -> (type, help); gauges fed from train_step's output keys of the same suffix
_GAUGES = {
    "myow_mining_weight": ("mining_weight", "mining loss weight lambda after warm-up/ramp"),
    "myow_learning_rate": ("learning_rate", "learning rate of this step"),
    "myow_ema_momentum": ("ema_momentum", "target EMA momentum tau of this step"),
    "myow_mining_pool_size": ("mining_pool_size", "candidates each anchor was mined against (global pool)"),
    "myow_mined_same_trial_ratio": ("mined_same_trial_ratio", "share of mined views from the anchor's own trial"),
    "myow_mined_time_gap_seconds": ("mined_time_gap_seconds", "mean abs time between anchor and mined view"),
    "myow_mined_label_agreement_ratio": ("mined_label_agreement_ratio",
                                         "share of mined views with the anchor's label (monitoring only)"),
    "myow_embedding_std": ("embedding_std", "std of l2-normalised online representations (collapse signal)"),
}
_LOSS_TERMS = {"augmented": "loss_augmented", "mined": "loss_mined", "total": "loss_total"}


class _Histogram:
    def __init__(self):
        self.counts = [0] * (len(SECONDS_BUCKETS) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(SECONDS_BUCKETS, value)] += 1
        self.sum += value

    def lines(self, name: str, labels: str) -> list[str]:
        out, total = [], 0
        for bound, count in zip((*SECONDS_BUCKETS, float("inf")), self.counts):
            total += count
            le = "+Inf" if bound == float("inf") else repr(bound)
            out.append(f'{name}_bucket{{{labels},le="{le}"}} {total}')
        out += [f"{name}_sum{{{labels}}} {self.sum!r}", f"{name}_count{{{labels}}} {total}"]
        return out


class NullMetrics:
    """Metrics disabled (``metrics.port: 0``)."""

    def update(self, out: dict, samples: int, step_seconds: float, data_wait_seconds: float) -> None:
        pass

    def close(self) -> None:
        pass


class MetricsServer(NullMetrics):
    """Per-rank Prometheus endpoint."""

    def __init__(self, host: str, port: int, rank: int = 0, world_size: int = 1):
        self.rank, self.world_size = rank, world_size
        self.steps, self.samples = 0, 0
        self.values: dict[str, float] = {}
        self.step_seconds, self.data_wait = _Histogram(), _Histogram()
        self.lock = threading.Lock()
        metrics = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (http.server API)
                if self.path.split("?")[0] not in ("/metrics", "/"):
                    self.send_error(404)
                    return
                body = metrics.render().encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):  # keep stderr for the training log
                pass

        try:
            self.server = ThreadingHTTPServer((host, port), Handler)
        except OSError as err:
            raise UserError(f"metrics.port {port}: cannot serve metrics on {host}:{port} ({err.strerror}); "
                            "choose another metrics.port or 0 to disable")
        self.server.daemon_threads = True
        self.address = self.server.server_address
        self.thread = threading.Thread(target=self.server.serve_forever, name="metrics", daemon=True)
        self.thread.start()

    def update(self, out: dict, samples: int, step_seconds: float, data_wait_seconds: float) -> None:
        """Record one optimizer step (``out`` = train_step's dict; None values are skipped)."""
        with self.lock:
            self.steps += 1
            self.samples = samples
            for key, value in out.items():
                if value is not None:
                    self.values[key] = value
            self.step_seconds.observe(step_seconds)
            self.data_wait.observe(data_wait_seconds)

    def render(self) -> str:
        """The text exposition format."""
        r = f'rank="{self.rank}"'
        with self.lock:
            lines = [
                "# HELP myow_train_steps_total optimizer steps", "# TYPE myow_train_steps_total counter",
                f"myow_train_steps_total{{{r}}} {self.steps}",
                "# HELP myow_train_samples_total anchor samples consumed",
                "# TYPE myow_train_samples_total counter", f"myow_train_samples_total{{{r}}} {self.samples}",
                "# HELP myow_loss last step's loss terms", "# TYPE myow_loss gauge",
            ]
            lines += [f'myow_loss{{term="{term}",{r}}} {self.values[key]!r}'
                      for term, key in _LOSS_TERMS.items() if key in self.values]
            for name, (key, help_text) in _GAUGES.items():
                if key in self.values:
                    lines += [f"# HELP {name} {help_text}", f"# TYPE {name} gauge",
                              f"{name}{{{r}}} {float(self.values[key])!r}"]
            for name, hist, help_text in (("myow_step_seconds", self.step_seconds, "wall time per optimizer step"),
                                          ("myow_data_wait_seconds", self.data_wait,
                                           "time blocked waiting for the next batch")):
                lines += [f"# HELP {name} {help_text}", f"# TYPE {name} histogram", *hist.lines(name, r)]
            lines += ["# HELP myow_world_size ranks", "# TYPE myow_world_size gauge",
                      f"myow_world_size{{{r}}} {self.world_size}"]
        return "\n".join(lines) + "\n"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def make_metrics(host: str, port: int, rank: int = 0, world_size: int = 1) -> NullMetrics:
    """A MetricsServer on ``port + LOCAL_RANK`` (env), or NullMetrics when port is 0."""
    if not port:
        return NullMetrics()
    return MetricsServer(host, port + int(os.environ.get("LOCAL_RANK", "0")), rank, world_size)
