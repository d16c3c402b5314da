"""``python -m p2pfm`` is the same as the ``p2pfm`` console script."""

from p2pfm.cli import main

raise SystemExit(main())
