"""The training loop: the trainer (``trainer``), one optimizer step (``step``), the ranks'
agreement on stopping and saving (``agreement``), stop signals (``stop_signals``), the non-finite
guard (``nonfinite``), early stopping, the hang watchdog and the test-only fault hooks."""
