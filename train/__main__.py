import os
import sys

from train.stop_signals import StopRequest

StopRequest.install()  # first: a USR1 during the imports below must not kill the trainer

from train import startup_gc  # noqa: E402

startup_gc.pause()  # until train.loop.trainer has imported what it needs (see train/startup_gc.py)

from train.noise import silence_known_noise  # noqa: E402

silence_known_noise()  # before transformers and datasets are imported (see train/noise.py)

from train.loop.trainer import main  # noqa: E402

code = main()
# Leave without tearing the process groups down: a gloo worker thread freeing its last work
# object needs the GIL, which ~ProcessGroupGloo holds while it waits for that thread (seen as a
# hang at exit on a busy machine). Every account (status.json, error report, metrics, TensorBoard,
# checkpoints) is written and flushed by now, and the peers passed the final barrier.
sys.stdout.flush()
sys.stderr.flush()
os._exit(code)
