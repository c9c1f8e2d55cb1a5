"""The one exception type of the command line, kept in a module that imports nothing."""


class UsageError(ValueError):
    """A mistake in the command line, the recipe or its paths: reported in one line, exit status 2."""
