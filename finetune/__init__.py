"""Stage 3: fine-tune a bundle on one dataset (full, LoRA, k-shot), evaluate (MRE/SDR), predict."""
