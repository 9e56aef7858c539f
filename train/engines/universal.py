"""``python -m train.engines.universal ARGS``: DeepSpeed's ``ds_to_universal`` with its arguments,
loading the checkpoint weights-only (it passes ``weights_only=False``; see ``train.checkpoint.safe_load``)."""

import runpy

from train.checkpoint.safe_load import forbid_code_in_checkpoints

if __name__ == "__main__":
    forbid_code_in_checkpoints(deepspeed=True)
    runpy.run_module("deepspeed.checkpoint.ds_to_universal", run_name="__main__", alter_sys=True)
