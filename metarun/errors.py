"""User-facing errors: one line that says which key or path is wrong and what was expected."""


class UserError(Exception):
    """A mistake in the config or the data the user pointed at, not a bug in metarun.

    The CLI prints `metarun: error: <message>` and exits with status 2, no traceback.
    """
