"""``python -m agentattn`` is the ``agentattn`` command (also what ``torchrun -m agentattn`` runs)."""

import sys

from .cli.main import main

sys.exit(main())
