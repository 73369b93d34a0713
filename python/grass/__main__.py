"""`python -m grass demo`: the same entry point as the `grass` console script."""

import sys

from .cli import main

sys.exit(main())
