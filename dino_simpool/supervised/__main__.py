"""``python -m dino_simpool.supervised``: the command line of :mod:`dino_simpool.supervised.cli`."""
import sys

from dino_simpool.supervised.cli import main

sys.exit(main())
