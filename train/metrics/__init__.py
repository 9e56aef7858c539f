"""What a run reports: FLOPs and MFU (``flops``), NVML telemetry (``telemetry``), the rank-0
writer (``writer``), per-step records and their phase timers (``step_metrics``, ``phase_clock``),
evaluation (``evaluation``), the task scores it computes (``scores``) and early stopping on them."""
