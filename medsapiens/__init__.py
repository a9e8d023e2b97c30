"""MedSapiens shared core: registry, shard record and manifest, storage, model, codec, metrics,
input pipeline, engine and config. It imports no stage package (shards, pretrain, finetune, launch)."""

__version__ = "0.1.0"
