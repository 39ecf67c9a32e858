"""`python -m cloister.cli ...` runs the `cloister` console script."""

import sys

from cloister.cli import main

sys.exit(main())
