"""`python -m kubetune_engine DIR --port PORT [...]` (see `server.parse_args`)."""

import sys

from .server import main

sys.exit(main())
