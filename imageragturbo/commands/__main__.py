"""``python -m imageragturbo.commands ...``: the ``imageragturbo`` command (e.g. under
``accelerate launch -m imageragturbo.commands train adapter ...``)."""

import sys

from .main import main

sys.exit(main())
