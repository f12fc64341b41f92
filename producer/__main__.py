"""``python -m producer`` is the ``audioq`` command."""

import sys

from producer.cli import main

sys.exit(main())
