"""`python -m compressor.cli`: the `compress` command without its console script."""

import sys

from compressor.cli.app import main

sys.exit(main())
