"""`python -m anbao.cli`, as the tests and the bench start the server."""

import sys

from . import main

sys.exit(main())
