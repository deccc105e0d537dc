"""`python -m minidb ...` (and `torchrun -m minidb train ...`) is the `minidb` command."""
import sys

from minidb.cli import main

sys.exit(main())
