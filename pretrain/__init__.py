"""Stage 2: multi-dataset DeepSpeed pretraining of the shared multi-head model, and bundle export."""
