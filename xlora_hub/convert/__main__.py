"""``python -m xlora_hub.convert``: exit 0 on success, 1 for a wrong input, 2 for a usage error."""

import sys

from .command import main

sys.exit(main())
