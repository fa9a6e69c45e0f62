"""Run the demo: ``python -m exporter.demo``."""

import sys

from exporter.demo.run import main

sys.exit(main())
