"""How the ``fastmfd`` command reads its command line and says a mistake in it:
:class:`CommandParser`, argparse's parser with the commands' conventions, and
:func:`in_options`, a library ConfigError in the words of the options typed.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Callable, Mapping, NoReturn

from ..errors import ConfigError

__all__ = ["CommandParser", "in_options", "EXIT_USAGE"]

EXIT_USAGE = 2              # a mistake in the command, found before any work (argparse's too)


class CommandParser(argparse.ArgumentParser):
    """argparse's parser, whose mistakes read as the commands' own do: one line
    on stderr, exit 2 (argparse prints its whole usage block first). It keeps
    each option's value as typed (``typed``, by flag: ``"10K"``, not 10240), for a
    message about the value."""

    commands: dict[str, CommandParser]      # the top parser's: each command's own

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.typed: dict[str, str] = {}

    def add_argument(self, *args: Any, **kwargs: Any) -> argparse.Action:
        action = super().add_argument(*args, **kwargs)
        if action.option_strings and callable(action.type):
            action.type = self._keeping_text(action.option_strings[-1], action.type)
        return action

    def _keeping_text(self, flag: str, convert: Callable[[str], Any]) -> Callable[[str], Any]:
        def keep(text: str) -> Any:
            value = convert(text)
            self.typed[flag] = text
            return value
        # argparse names a type that raised ValueError by it: "invalid int value: 'x'"
        keep.__name__ = getattr(convert, "__name__", repr(convert))
        return keep

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: {message} (see {self.prog} --help)\n")

    def parse_command_line(self, argv: list[str] | None) -> argparse.Namespace:
        """parse_args, in two parts: this parser takes what comes before the
        command (-v, --version, --help: none takes a value, so the first word
        is the command) and refuses anything else there; the command's parser
        takes the rest, and says what it does not take. Its positionals may
        follow its options (``send ADDR --state S IMG``: argparse alone takes
        positionals in one run, and left IMG over)."""
        argv = list(sys.argv[1:] if argv is None else argv)
        at = next((i for i, word in enumerate(argv) if not word.startswith("-")), len(argv))
        top = self.parse_args(argv[:at])
        if at == len(argv):
            self.error("the following arguments are required: COMMAND")
        command = argv[at]
        if command not in self.commands:
            self.error(f"argument COMMAND: invalid choice: {command!r} (choose from "
                       f"{', '.join(self.commands)})")
        # -v before the command and after it add up.
        return self.commands[command].parse_intermixed_args(
            argv[at + 1:], argparse.Namespace(command=command, verbose=top.verbose))


def in_options(error: ConfigError, options: Mapping[str, str], args: argparse.Namespace,
               parser: CommandParser) -> str:
    """``error`` as the command line says it: about a library parameter one of
    ``options`` (parameter -> flag) gave its value to, ``--flag VALUE: problem``
    with the value as typed (``parser.typed``, by flag; an option argparse did not
    convert has its text as its value), or, for an option not given, its default's
    value said to be the default, with the option that changes it (it was said as
    if typed); any other, as the library says it."""
    flag = options.get(error.parameter or "")
    if flag is None or not error.problem:
        return str(error)
    # (the option's dest, as argparse makes it from the flag)
    dest = flag.lstrip("-").replace("-", "_")
    text = parser.typed.get(flag, getattr(args, dest, None))
    if text is None:            # not this command's option, or not given: the library's value
        return str(error)
    if _defaulted(flag, args, parser):
        return (f"{flag} {_shown(getattr(args, dest))} (the default; give {flag} to change "
                f"it): {error.problem}")
    # The other options the problem is about, those not typed said to be defaults.
    defaults = [f"{other} {_shown(getattr(args, other.lstrip('-').replace('-', '_')))}"
                for other in (options.get(name) for name in error.involves)
                if other is not None and _defaulted(other, args, parser)]
    return f"{flag} {text}: {error.problem}" + (
        f" ({' and '.join(defaults)}: {'the defaults' if len(defaults) > 1 else 'the default'})"
        if defaults else "")


def _defaulted(flag: str, args: argparse.Namespace, parser: CommandParser) -> bool:
    """Whether option ``flag`` has its default's value, not one typed (and has one)."""
    dest = flag.lstrip("-").replace("-", "_")
    value = getattr(args, dest, None)
    return (flag not in parser.typed and value is not None
            and value == parser.get_default(dest))


def _shown(value: Any) -> str:
    """An option's value as ``--help`` says it (30, not 30.0)."""
    return f"{value:g}" if isinstance(value, float) else str(value)
