"""``python -m scripts.workflows run <workflow> ...``: see :mod:`scripts.workflows.run`."""

import sys

from .run import main

sys.exit(main())
