"""`python -m bundler`: the same as the `bundler` command."""

import sys

from .cli import main

sys.exit(main())
