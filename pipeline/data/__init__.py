"""The trainer's data: both kinds behind one interface (:mod:`pipeline.data.interface`).

    interface      TrainData / Session / Stream protocols; SessionList (shared bookkeeping)
    stages         small resumable stream stages (epoch order, rank shards, shuffle buffer, prefetch)
    recording      a recording store: metadata in memory, counts read in blocks
    jitter         temporal-jitter positive pairs
    augment        normalisation and the neural augmentations
    samplers       in-memory anchor and pool samplers of binned rates
    streams        block streams for stores larger than memory
    context        the temporal-context bank for mining (method.mining_context_bins)
    neural         sessions of recording stores -> NeuralTrainData
    image_views    image views T / T_m and normalisation
    image_shards   image shard sets: read, decode, load
    image_streams  image anchor and pool streams
    images         image selections and sessions -> ImageTrainData

Nothing here imports the read-outs or the trainer; :mod:`pipeline.kinds` chooses the kind.
"""
