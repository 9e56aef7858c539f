"""Checkpoints: the manager that saves and restores every stateful part atomically (``manager``),
the on-disk format and its digests (``files``), loading that runs no code (``safe_load``) and the
small stateful parts it collects (``state``). When to save is the loop's (``train.loop.save_schedule``)."""
