"""``python -m lorakit`` is the ``lorakit`` command (torchrun launches it this way)."""

import sys

from .cli import main

sys.exit(main())
