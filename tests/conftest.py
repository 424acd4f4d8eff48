"""Shared fixtures: the real data folder (skipped when absent), synthetic Phy folders, a local S3."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def shared_path(*parts: str) -> Path:
    """A path under ../shared/data, or skip the test (with the reason) when it is absent."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"real data not available: {path} is absent")
    return path


def make_phy(folder: Path, n_units: int = 6, duration_s: float = 20.0, rate_hz: float = 20.0, seed: int = 0,
             sample_rate: int = 30000, groups: list[str] | None = None, params: bool = True,
             on_edges: int = 0, bin_samples: int = 300) -> tuple[np.ndarray, np.ndarray]:
    """Write a small Poisson Phy folder; returns (times (S,), clusters (S,)).

    ``on_edges`` extra spikes are placed exactly on bin edges of ``bin_samples``.
    """
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    n = rng.poisson(rate_hz * duration_s, size=n_units)
    clusters = np.repeat(np.arange(n_units, dtype=np.int32), n)
    times = rng.integers(0, int(duration_s * sample_rate), size=len(clusters)).astype(np.uint64)
    if on_edges:
        edge_t = (rng.integers(1, int(duration_s * sample_rate) // bin_samples, size=on_edges) * bin_samples)
        times = np.concatenate([times, edge_t.astype(np.uint64)])
        clusters = np.concatenate([clusters, rng.integers(0, n_units, size=on_edges).astype(np.int32)])
    order = np.argsort(times, kind="stable")
    times, clusters = times[order], clusters[order]
    np.save(folder / "spike_times.npy", times[:, None])
    np.save(folder / "spike_clusters.npy", clusters)
    groups = groups or ["good" if u % 3 else "mua" for u in range(n_units)]
    (folder / "cluster_group.tsv").write_text("cluster_id\tgroup\n" + "".join(f"{u}\t{g}\n" for u, g in enumerate(groups)))
    if params:
        (folder / "params.py").write_text(f"dat_path = 'raw.bin'\nn_channels_dat = 385\ndtype = 'int16'\n"
                                          f"offset = 0\nsample_rate = {sample_rate}.\nhp_filtered = False\n")
    return times, clusters


@pytest.fixture(scope="session")
def s3_server():
    """A moto S3 server on 127.0.0.1 (random port), as zarr and s3fs test themselves.

    Yields (endpoint_url, storage_options); sets fake credentials for the session.
    """
    pytest.importorskip("moto")
    pytest.importorskip("s3fs")
    from moto.server import ThreadedMotoServer

    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")}
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    try:
        yield endpoint, {"endpoint_url": endpoint, "key": "testing", "secret": "testing"}
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture
def s3_bucket(s3_server):
    """A fresh bucket on the local S3 server: yields (bucket_url, storage_options)."""
    import uuid

    import s3fs

    endpoint, options = s3_server
    fs = s3fs.S3FileSystem(**options, skip_instance_cache=True)
    name = f"test-{uuid.uuid4().hex[:10]}"
    fs.mkdir(name)
    yield f"s3://{name}", options
