import sys

from swajax.cli.entry import main

sys.exit(main())
