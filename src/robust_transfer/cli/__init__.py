"""The `robust-transfer` command line: thin typer commands over the Python API.

Commands live in topic modules (`study`, ...), each registering on the one `app`. Every input
error ends the same way: one `error: ...` line on stderr and exit code 2, whether it is a
`UserError` raised anywhere below or a parse error of typer/click (`--eps abc`, a missing
`--out`); `--debug` shows the traceback of a `UserError` instead. Ctrl-C is one line and exit
code 130 (for a command running a study it says that re-running it resumes), also while
the commands are still being imported (a second or more of torch).
"""

from __future__ import annotations

import os
import signal
import sys


def _interrupted_while_importing(_signum, _frame) -> None:
    os.write(2, b"interrupted\n")
    os._exit(130)


# First thing, before the heavy imports: Ctrl-C during them is one line and exit 130, not a
# traceback. The previous handler comes back once the commands are registered (below).
try:
    _sigint_before = signal.signal(signal.SIGINT, _interrupted_while_importing)
    _sigint_set = True
except ValueError:  # imported off the main thread: signals are not ours to handle
    _sigint_before, _sigint_set = None, False

import typer  # noqa: E402
from typer._click import exceptions as click_errors  # noqa: E402
from typer.core import TyperOption  # noqa: E402

from robust_transfer.errors import UserError  # noqa: E402

app = typer.Typer(
    name="robust-transfer",
    help="What transfers from a pretrained source model: accuracy with little data, "
    "adversarial robustness, backdoors, biases and watermarks.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode="markdown",  # reflow docstring paragraphs instead of keeping line breaks
)
_state: dict = {"debug": False, "command": None, "resumable": False}


def mark_resumable() -> None:
    """Called by a command once it runs a study: a Ctrl-C from then on says that running the
    same command again resumes where it stopped."""
    _state["resumable"] = True

_value_type_rich = TyperOption.display_type_rich


def _flag_type_rich(self: TyperOption, ctx) -> str | None:
    """Rich help shows a flag (`--debug`, `--overwrite`, `--help`) without a `<bool>` value,
    as the plain help does: a flag takes no value."""
    return None if self.is_flag else _value_type_rich(self, ctx)


TyperOption.display_type_rich = _flag_type_rich


@app.callback()
def _root(
    ctx: typer.Context,
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors."),
) -> None:
    _state["debug"] = debug
    _state["command"] = ctx.invoked_subcommand


from robust_transfer.cli import (  # noqa: E402,F401  (register commands)
    attack,
    backdoor,
    backdoor_transfer,
    backdoor_updates,
    bias,
    certify,
    checkpoints,
    defend,
    distill,
    explain,
    studies,
    study,
    watermark,
)

if _sigint_set:  # None: a handler set outside Python, whose default we restore
    signal.signal(signal.SIGINT, _sigint_before or signal.default_int_handler)

# Options that take several values after one flag (`--eps 0.1 0.2 0.3`); click wants the
# flag repeated, so argv is rewritten before parsing.
MULTI_VALUE_OPTIONS = {"--eps", "--strength", "--update-images", "--sigma", "--radius"}


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


def _one_line(message: str) -> str:
    return "; ".join(line.strip() for line in str(message).splitlines() if line.strip())


def _usage_error_line(e: click_errors.ClickException) -> str:
    """click's message (it names the option) plus where to look, on one line."""
    line = f"error: {_one_line(e.format_message())}"
    ctx = getattr(e, "ctx", None)
    if ctx is not None:
        line += f" (see '{ctx.command_path} --help')"
    return line


def _interrupted() -> None:
    message = "interrupted"
    if _state["resumable"]:
        message += ("; finished runs are saved: run the same command again to resume where "
                    "it stopped")
    print(message, file=sys.stderr)
    sys.exit(130)


def main(argv: list[str] | None = None) -> None:
    """Entry point; `argv` defaults to sys.argv[1:]. Always ends in SystemExit.

    click runs in non-standalone mode, so its parse errors come back here as exceptions and
    are printed like every other input error: one `error:` line, exit code 2.
    """
    argv = sys.argv[1:] if argv is None else argv
    _state.update(debug=False, command=None, resumable=False)
    try:
        code = app(args=expand_multi_value_options(argv), prog_name="robust-transfer",
                   standalone_mode=False)
    except click_errors.NoArgsIsHelpError as e:  # bare `robust-transfer`: help, success
        print(e.format_message())
        sys.exit(0)
    except click_errors.ClickException as e:  # bad/missing option or argument, bad file
        print(_usage_error_line(e), file=sys.stderr)
        sys.exit(2)
    except UserError as e:
        if _state["debug"]:
            raise
        print(f"error: {_one_line(str(e))}", file=sys.stderr)
        sys.exit(2)
    except (KeyboardInterrupt, typer.Abort):
        _interrupted()
    if code == 130:  # typer turns KeyboardInterrupt into Exit(130), returned in this mode
        _interrupted()
    sys.exit(code if isinstance(code, int) else 0)
