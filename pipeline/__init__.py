"""Training and evaluation pipeline for MYOW on recording stores.

    config.py      Config (one dataclass per stage), YAML + ``--set key=value`` overrides
    data.py        store -> splits, normalisation, augmentations, AnchorSampler + PoolSampler
    build.py       model / optimizer factories
    train.py       ``python -m pipeline.train``: train_step (one MYOW/BYOL step) + the loop
    evaluate.py    ``python -m pipeline.evaluate``: frozen encoder -> read-outs, embeddings, plots
    checkpoint.py  atomic checkpoints (weights_only loading), RNG states
    metrics.py     Prometheus endpoint (metrics.port)
    supervised.py  supervised MLP baseline (method.name: supervised)
    demo.py        the embedded demo (``python -m pipeline.train`` with no arguments)

Dependencies point one way: ``pipeline -> model`` and ``pipeline -> preprocess`` (store schema).
"""
