"""`python -m nkat_search.cli`: the same as the nkat-search command."""

import sys

from .main import main

sys.exit(main())
