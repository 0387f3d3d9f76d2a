"""``python -m lightwatch``: the ``lightwatch`` command (:mod:`lightwatch.cli`)."""
import sys

from lightwatch.cli import main

if __name__ == "__main__":
    sys.exit(main())
