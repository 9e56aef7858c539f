"""``shardforge`` / ``python -m launch``: the CLI's entry point.

For ``run`` the stop signals are blocked before anything heavy is imported, so a signal during
the seconds of imports and validation waits for the handlers ``run`` installs
(``train.stop_signals.StopRequest``) instead of killing the launcher.
"""

import signal
import sys

from train.stop_signals import STOP_SIGNALS  # a light module: signal and contextlib only


def main() -> int:
    if sys.argv[1:2] == ["run"]:
        signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    from launch.cli import main as cli_main

    return cli_main()


if __name__ == "__main__":
    sys.exit(main())
