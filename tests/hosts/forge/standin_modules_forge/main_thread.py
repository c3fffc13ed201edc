"""Stand-in for `modules_forge.main_thread` (Forge's UI generation runs there; the API and we do not)."""

last_exception = None


def run_and_wait_result(func, *args, **kwargs):
    return func(*args, **kwargs)
