"""``python -m xlora_hub``: the ``xlora-hub`` command."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
