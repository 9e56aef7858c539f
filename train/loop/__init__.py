"""The training loop, the top of train/ (no other room imports it): the trainer (``trainer``),
one optimizer step (``step``), the ranks' agreement on stopping and saving (``agreement``), when
to save (``save_schedule``), the non-finite guard (``nonfinite``) and the hang watchdog."""
