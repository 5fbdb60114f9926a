"""`python -m netvm`: the same as the `netvm` command."""

from netvm.cli import main

raise SystemExit(main())
