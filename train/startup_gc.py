"""Python's cyclic garbage collector while a rank starts: off during the heavy imports (their
hundreds of thousands of long-lived objects would be rescanned pass after pass), then those objects
frozen (``gc.freeze``) and the collector on again before anything is built. It saves about 1 s to
the first step on a 2-core machine (commit history and benchmarks/RESULTS.md). The multi-node agent
(``launch.agent``) imports the same way.
"""

import gc


def pause() -> None:
    """Before the first heavy import."""
    gc.disable()


def resume() -> None:
    """After the heavy imports (torch, transformers' model stack, DeepSpeed), before anything is built."""
    gc.freeze()
    gc.enable()
