"""``python -m momentum_contrast.convert``: see ``momentum_contrast.convert.main``."""

import sys

from momentum_contrast.convert._cli import main

sys.exit(main())
