"""`python -m e2ip.cli`."""

import sys

from e2ip.cli import main

sys.exit(main())
