"""Errors clipes reports to users: each names the file or flag at fault."""


class ClipesError(Exception):
    """Base class: a problem with the user's input or set-up, reported without a traceback."""
