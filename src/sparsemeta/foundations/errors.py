"""The one exception type for user mistakes: the CLI prints it as one line and exits 2."""


class UserError(Exception):
    """A mistake the user can fix (bad key, bad value, missing file); never a bug."""
