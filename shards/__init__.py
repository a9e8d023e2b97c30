"""Stage 1: raw datasets in their native layouts -> validated WebDataset shards (local or S3).

Build defaults live here so the CLI can show them without importing the (heavier) builder.
"""
import os

DEFAULT_MAX_SIDE = 1024  # long side of the stored image: enough for 1024x768 training crops
DEFAULT_SHARD_SIZE = 256
DEFAULT_WORKERS = min(4, os.cpu_count() or 1)
DEFAULT_MULTIPART_MB = 64
OUTSIDE_CHOICES = ("reject", "invisible")
