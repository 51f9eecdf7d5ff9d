"""``python -m bridge``: the sipbridge CLI."""

import sys

from bridge.cli import main

sys.exit(main())
