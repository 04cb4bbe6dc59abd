"""``python -m xlora_hub.cli``: the ``xlora-hub`` command (as ``python -m xlora_hub``)."""

import sys

from .app import main

if __name__ == "__main__":
    sys.exit(main())
