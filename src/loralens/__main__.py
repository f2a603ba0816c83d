"""``python -m loralens``: the ``loralens`` command (:func:`loralens.cli.main`)."""

import sys

from loralens.cli import main

if __name__ == "__main__":
    sys.exit(main())
