"""`python -m medsapiens.checkpoints`: the universal-checkpoint converter's name before the core was
grouped by layer, kept for scripts that call it; it runs `python -m medsapiens.training.checkpoints`."""
import runpy

if __name__ == "__main__":
    runpy.run_module("medsapiens.training.checkpoints", run_name="__main__", alter_sys=True)
