"""Training and evaluation pipeline: recording stores and image shards in, runs out.

    train.py, evaluate.py, demo.py   the CLIs (parse and dispatch)
    loop.py        the training loop; startup.py: everything checked before a run writes
    methods.py     the one module that knows the methods (MYOW, BYOL, SimCLR, RP, TS, AE,
                   pi-VAE, supervised); step.py / baseline_steps.py: their optimizer steps
    kinds.py       the one module that knows the data kinds; data/: both kinds' streams
    readout/       the read-outs (probes, neural, images, pictures, runs)
    config.py (+ config_parse.py), build.py, checkpoint.py, distributed.py, metrics.py,
    runtime.py, cli.py, supervised.py

README "Layout" has the import rules. Dependencies point one way: ``pipeline -> model`` and
``pipeline -> preprocess`` (store schema, errors).
"""
