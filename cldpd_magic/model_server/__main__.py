"""``python -m cldpd_magic.model_server serve``: the scripted model server's command line."""

import sys

from .server import main

sys.exit(main())
