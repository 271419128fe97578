"""``python -m flextron``: the same command line as the ``flextron`` script."""

import sys

from flextron.cli import main

sys.exit(main())
