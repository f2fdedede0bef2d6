"""`python -m sparse_circuits`: the same as the `sparse-circuits` command."""

import sys

from sparse_circuits.cli.main import main

sys.exit(main())
