"""`python -m hcrepo` runs the `hcrepo` command."""

import sys

from hcrepo.cli import main

sys.exit(main())
