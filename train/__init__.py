"""shardforge's per-rank training program (``python -m train RUN_DIR``); never imports ``launch``."""
