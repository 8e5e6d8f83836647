"""`python -m edgeqtl.cli ...`, the same as `edgeqtl ...`."""
import sys

from edgeqtl.cli import main

sys.exit(main())
