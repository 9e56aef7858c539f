"""Checkpoints: the manager that saves and restores every stateful part atomically (``manager``),
the on-disk format and its digests (``files``), loading that runs no code (``safe_load``), when
to save (``schedule``) and the small stateful parts it collects (``state``)."""
