"""Stage 1: raw datasets in their native layouts -> validated WebDataset shards (local or S3)."""
