"""User-facing errors: the CLI prints them as one line and exits with status 2."""


class UserError(Exception):
    """Bad input from the user (a spec, a path, a shape): a one-line message, exit status 2."""

    exit_code = 2
