"""`python -m agent` is `deadlock-agent`."""

import sys

from agent.cli import main

sys.exit(main())
