"""The one exception type for bad user input.

Raised at the edge (bad name, negative eps, too many shots, corrupt file); the CLI turns it
into one line on stderr and exit code 2.
"""


class UserError(ValueError):
    """Bad input from the user: the message names the bad value and what is allowed."""


def check_choice(kind: str, value: str, allowed) -> None:
    """Raise `UserError` unless `value` is one of `allowed`."""
    allowed = sorted(allowed)
    if value not in allowed:
        raise UserError(f"unknown {kind} {value!r}; allowed: {', '.join(map(str, allowed))}")
