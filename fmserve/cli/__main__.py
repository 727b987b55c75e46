"""`python -m fmserve.cli`: the `fmserve` command."""

import sys

from fmserve.cli.commands import main

sys.exit(main())
