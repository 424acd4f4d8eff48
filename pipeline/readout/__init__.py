"""Read-outs of a frozen representation: the paper's evaluation protocols.

    probes    pure probes on arrays (reach ridge, logistic regression, image linear probe, kNN)
    neural    embed a recording, read out every task, evaluate a saved neural run
    images    embed images, linear probe + kNN + mining pictures, evaluate a saved image run
    pictures  t-SNE, mining agreement, mined-view grids, the mining confusion matrix
    runs      a saved run's config and checkpoint; the --export-embeddings target

Reads :mod:`pipeline.data` and :mod:`model`; never the trainer.
"""
