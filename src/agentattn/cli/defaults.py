"""Every option's help ends with its default, as ``argparse.ArgumentDefaultsHelpFormatter`` would show it if the
option had a help text and a parser-level default."""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any


def show_defaults(parser: argparse.ArgumentParser) -> None:
    """Give options without a help text one that shows their default (the formatter skips help-less options),
    in ``parser`` and its sub-commands."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                show_defaults(sub)
        elif (
            action.option_strings
            and action.help is None
            and action.default not in (None, argparse.SUPPRESS)
            and not isinstance(action, argparse._StoreConstAction)  # flags: store_true / store_false
        ):
            action.help = "(default: %(default)s)"


def show_config_defaults(parser: argparse.ArgumentParser, config_cls: Any) -> None:
    """End the help of each option whose parser default is SUPPRESS (so that a command can tell given options
    from defaults) with the default of the dataclass field of the same name."""
    defaults = {
        f.name: f.default for f in dataclasses.fields(config_cls) if f.default is not dataclasses.MISSING
    }
    for action in parser._actions:
        if action.default is not argparse.SUPPRESS or defaults.get(action.dest) is None:
            continue
        if isinstance(action, argparse._StoreConstAction):  # flags: off unless given
            continue
        note = f"(default: {defaults[action.dest]})".replace("%", "%%")
        action.help = f"{action.help} {note}" if action.help else note
