"""The one exception type a user sees: a problem they can fix, printed as a single line."""

import sys
from collections.abc import Callable


class UserError(Exception):
    """Bad input (a path, a flag, a data file). Entry points print it as `error: ...` and exit 2."""


def first_line(err: BaseException, limit: int = 300) -> str:
    """The gist of a library's (often multi-line) exception, to quote inside a UserError."""
    text = str(err).strip()
    return text.splitlines()[0][:limit] if text else type(err).__name__


def exit_status(work: Callable[[], None]) -> int:
    """Run a command's work: a UserError becomes one `error: ...` line on stderr and status 2."""
    try:
        work()
    except UserError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 2
    return 0
