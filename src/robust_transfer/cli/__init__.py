"""The `robust-transfer` command line: thin typer commands over the Python API.

Commands live in topic modules (`study`, ...), each registering on the one `app`. Bad input
raises `UserError` anywhere below; `main` turns it into one line on stderr and exit code 2
(`--debug` shows the traceback instead).
"""

from __future__ import annotations

import sys

import typer

from robust_transfer.errors import UserError

app = typer.Typer(
    name="robust-transfer",
    help="What transfers from a pretrained source model: accuracy with little data, "
    "adversarial robustness, backdoors and biases.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode="markdown",  # reflow docstring paragraphs instead of keeping line breaks
)
_state = {"debug": False}


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors."),
) -> None:
    _state["debug"] = debug


from robust_transfer.cli import attack, explain, study  # noqa: E402,F401  (register commands)

# Options that take several values after one flag (`--eps 0.1 0.2 0.3`); click wants the
# flag repeated, so argv is rewritten before parsing.
MULTI_VALUE_OPTIONS = {"--eps"}


def _is_number(token: str) -> bool:
    try:
        float(token)
    except ValueError:
        return False
    return True


def expand_multi_value_options(argv: list[str]) -> list[str]:
    """`--eps 0.1 0.2` -> `--eps 0.1 --eps 0.2` for MULTI_VALUE_OPTIONS; numbers only, so a
    positional argument after the values stays positional."""
    result, current = [], None
    for token in argv:
        if token.startswith("--"):
            current = token if token in MULTI_VALUE_OPTIONS else None
            result.append(token)
        elif current is not None and result[-1] != current and _is_number(token):
            result += [current, token]
        else:
            result.append(token)
    return result


def main(argv: list[str] | None = None) -> None:
    """Entry point; `argv` defaults to sys.argv[1:]. Always ends in SystemExit."""
    argv = sys.argv[1:] if argv is None else argv
    _state["debug"] = False
    try:
        app(args=expand_multi_value_options(argv), prog_name="robust-transfer")
    except UserError as e:
        if _state["debug"]:
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
