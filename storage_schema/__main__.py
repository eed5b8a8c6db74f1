"""Entry point of `python -m storage_schema`."""

import sys

from storage_schema.cli import main

sys.exit(main())
