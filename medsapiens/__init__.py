"""MedSapiens: anatomical landmark detection with Sapiens ViTs.

This package is the core library (errors, config, distributed, io, data, model, evaluation, deploy,
training: docs/ARCHITECTURE.md); the stages install beside it as medsapiens.shards, .pretrain,
.finetune, .evaluate and .launch. The core imports no stage."""

__version__ = "0.1.0"
