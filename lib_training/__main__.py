"""`python -m lib_training ...`: the command-line interface."""

from lib_training.app.cli import main

raise SystemExit(main())
