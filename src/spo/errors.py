"""The one exception type for bad input.

Anything the user can fix (a missing file, a bad value, a wrong model family) raises `SpoInputError`;
the CLI turns it into a one-line message and exit code 2. Everything else is a bug and keeps its traceback.
"""


class SpoInputError(Exception):
    """Bad input: a file, a value or a combination the user gave. The message names the problem."""


def require(condition: bool, message: str) -> None:
    if not condition:
        raise SpoInputError(message)
