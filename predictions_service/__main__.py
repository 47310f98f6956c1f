"""``python -m predictions_service --port 8008 --token T`` (see ``predictions_service.cli``)."""

import sys

from .cli import main

sys.exit(main())
