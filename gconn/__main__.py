"""``python -m gconn``: the same as the ``gconn`` command."""

from gconn.cli import main  # cli patches the standard library before anything imports socket

raise SystemExit(main())
