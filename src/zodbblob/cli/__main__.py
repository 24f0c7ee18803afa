"""``python -m zodbblob.cli``: what the ``zodbblob`` script runs."""

import sys

from zodbblob.cli import main

sys.exit(main())
