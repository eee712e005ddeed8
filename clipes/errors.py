"""Errors clipes reports to users: each names the file or flag at fault."""


class ClipesError(Exception):
    """Base class: a problem with the user's input or set-up, reported without a traceback."""


def brief(error: BaseException, limit: int = 200) -> str:
    """An exception's message on one line and at most ``limit`` characters, to quote in a ClipesError."""
    return " ".join(str(error).split())[:limit] or type(error).__name__
