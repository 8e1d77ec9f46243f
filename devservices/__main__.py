"""``python -m devservices start|stop|status``."""

import sys

from devservices.cli import main

sys.exit(main())
