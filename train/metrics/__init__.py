"""What a run reports: FLOPs and MFU (``flops``), NVML telemetry (``telemetry``), the rank-0
writer (``writer``), per-step records (``step_metrics``), evaluation (``evaluation``) and the
task scores it computes (``scores``)."""
