"""`python -m swajax.bench attention|generate|train ...`."""

import sys

from swajax.bench import main

sys.exit(main())
