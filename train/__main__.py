import sys

from train.stop import StopRequest

StopRequest.install()  # first: a USR1 during the imports below must not kill the trainer

from train.loop import main  # noqa: E402

sys.exit(main())
