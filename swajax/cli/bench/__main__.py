"""`python -m swajax.cli.bench attention|generate|train ...`."""

import sys

from swajax.cli.bench import main

sys.exit(main())
