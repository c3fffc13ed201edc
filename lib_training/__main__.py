"""`python -m lib_training ...`: the command-line interface."""

from lib_training.cli import main

raise SystemExit(main())
