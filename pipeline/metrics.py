"""Prometheus metrics of one training process (docs/contracts.md section 6), with prometheus_client.

``MetricsServer(host, port, rank, world_size)`` registers the contract metrics in its own
registry (one per rank, every series labelled ``rank``) and serves them on
``http://host:port/metrics`` from prometheus_client's server thread; the training loop
calls :meth:`MetricsServer.update` once per step. With ``metrics.port: 0`` the loop gets
:class:`NullMetrics` instead.
"""

from __future__ import annotations

import os

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from preprocess.errors import UserError

__all__ = ["MetricsServer", "NullMetrics", "make_metrics", "SECONDS_BUCKETS"]

SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

# metric name -> (train_step output key, help)
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


class NullMetrics:
    """Metrics disabled (``metrics.port: 0``)."""

    def update(self, out: dict, samples: int, step_seconds: float, data_wait_seconds: float) -> None:
        pass

    def observe_checkpoint(self, seconds: float) -> None:
        pass

    def close(self) -> None:
        pass


class MetricsServer(NullMetrics):
    """Per-rank Prometheus endpoint on ``host:port``."""

    def __init__(self, host: str, port: int, rank: int = 0, world_size: int = 1):
        self.registry = CollectorRegistry()
        labels, self.rank = ["rank"], str(rank)
        reg = self.registry
        self.steps = Counter("myow_train_steps", "optimizer steps", labels, registry=reg)
        self.samples = Counter("myow_train_samples", "anchor samples consumed", labels, registry=reg)
        self.loss = Gauge("myow_loss", "last step's loss terms", ["term", "rank"], registry=reg)
        self.gauges = {key: Gauge(name, help_text, labels, registry=reg).labels(rank=self.rank)
                       for name, (key, help_text) in _GAUGES.items()}
        self.step_seconds = Histogram("myow_step_seconds", "wall time per optimizer step", labels,
                                      buckets=SECONDS_BUCKETS, registry=reg).labels(rank=self.rank)
        self.data_wait = Histogram("myow_data_wait_seconds", "time blocked waiting for the next batch", labels,
                                   buckets=SECONDS_BUCKETS, registry=reg).labels(rank=self.rank)
        Gauge("myow_world_size", "ranks", labels, registry=reg).labels(rank=self.rank).set(world_size)
        # beyond the contract: what an operator watches
        self.samples_rate = Gauge("myow_train_samples_per_second", "anchor samples per second over the last step "
                                  "(all ranks' anchors / (step + data wait))", labels, registry=reg).labels(rank=self.rank)
        self.checkpoint_seconds = Histogram("myow_checkpoint_seconds", "wall time to write a checkpoint", labels,
                                            buckets=SECONDS_BUCKETS, registry=reg).labels(rank=self.rank)
        self.rss = Gauge("myow_process_resident_memory_bytes", "resident memory of this rank's process", labels,
                         registry=reg).labels(rank=self.rank)
        self.rss.set_function(_resident_bytes)
        self._samples_seen = 0
        try:
            self.server, self.thread = start_http_server(port, addr=host, registry=reg)
        except OSError as err:
            raise UserError(f"metrics.port {port}: cannot serve metrics on {host}:{port} ({err.strerror}); "
                            "choose another metrics.port or 0 to disable")
        self.address = self.server.server_address[:2]

    def update(self, out: dict, samples: int, step_seconds: float, data_wait_seconds: float) -> None:
        """Record one optimizer step (``out`` = train_step's dict; None values are skipped).

        ``samples`` is the cumulative count of anchor samples consumed.
        """
        self.steps.labels(rank=self.rank).inc()
        new = max(0, samples - self._samples_seen)
        if step_seconds + data_wait_seconds > 0:
            self.samples_rate.set(new / (step_seconds + data_wait_seconds))
        self.samples.labels(rank=self.rank).inc(new)
        self._samples_seen = max(self._samples_seen, samples)
        for term, key in _LOSS_TERMS.items():
            if out.get(key) is not None:
                self.loss.labels(term=term, rank=self.rank).set(out[key])
        for key, gauge in self.gauges.items():
            if out.get(key) is not None:
                gauge.set(out[key])
        self.step_seconds.observe(step_seconds)
        self.data_wait.observe(data_wait_seconds)

    def observe_checkpoint(self, seconds: float) -> None:
        self.checkpoint_seconds.observe(seconds)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _resident_bytes() -> float:
    import psutil

    return float(psutil.Process().memory_info().rss)


def make_metrics(host: str, port: int, rank: int = 0, world_size: int = 1) -> NullMetrics:
    """A MetricsServer on ``port + LOCAL_RANK`` (env), or NullMetrics when port is 0."""
    if not port:
        return NullMetrics()
    return MetricsServer(host, port + int(os.environ.get("LOCAL_RANK", "0")), rank, world_size)
