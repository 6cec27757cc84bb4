"""``python -m aeventor`` is the ``aeventor`` command."""

import sys

from .cli import main

sys.exit(main())
