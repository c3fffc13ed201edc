"""Stand-in for `modules.errors`: what the hosts print when a script or an extra network fails (kept in
`reported` for the tests to read; with `exc_info`, the exception's message as its traceback shows it)."""

import sys

reported = []


def report(message, *, exc_info=False):
    error = sys.exc_info()[1] if exc_info else None
    reported.append(message if error is None else f"{message}: {type(error).__name__}: {error}")


def display(e, task, *, full_traceback=False):
    reported.append(f"{task}: {type(e).__name__}: {e}")
