"""The one exception type a user sees: a problem they can fix, printed as a single line."""


class UserError(Exception):
    """Bad input (a path, a flag, a data file). Entry points print it as `error: ...` and exit 2."""
