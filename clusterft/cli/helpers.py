"""Building blocks of the `clusterft` command: one subcommand, a group of actions, a directory option.

Every command module wires itself with these, so each subcommand's help doubles as its description,
each group's ACTION is required, and every `$ENV or ./default` directory option reads the same way:

    run = add_group(commands, "registry", "registered model versions", options=[registry_option])
    sub = run("list", registry_list, "list models, or the versions of one model")
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Sequence

Handler = Callable[[argparse.Namespace], int]
Subcommands = argparse._SubParsersAction  # what `ArgumentParser.add_subparsers()` returns
AddAction = Callable[..., argparse.ArgumentParser]


def add_command(
    commands: Subcommands, name: str, handler: Handler, help: str, description: str | None = None
) -> argparse.ArgumentParser:
    """A subcommand that runs `handler(args)`; its description is its help unless given."""
    sub = commands.add_parser(name, help=help, description=description or help)
    sub.set_defaults(handler=handler)
    return sub


def add_group(
    commands: Subcommands,
    name: str,
    help: str,
    description: str | None = None,
    options: Sequence[Callable[[argparse.ArgumentParser], None]] = (),
) -> AddAction:
    """A command group (`clusterft NAME [options] ACTION ...`); returns `add_action(name, handler,
    help, description=None)`. `options` add the group's own flags, which precede the ACTION."""
    group = commands.add_parser(name, help=help, description=description or help)
    for add_option in options:
        add_option(group)
    actions = group.add_subparsers(dest=f"{name}_command", metavar="ACTION", required=True)

    def add_action(
        action: str, handler: Handler, help: str, description: str | None = None
    ) -> argparse.ArgumentParser:
        return add_command(actions, action, handler, help, description)

    return add_action


def add_dir_option(parser: argparse.ArgumentParser, flag: str, env: str, default: str, what: str) -> None:
    """`flag DIR`, defaulting to `$env` when set, else `./default`; the help says both."""
    parser.add_argument(
        flag,
        default=os.environ.get(env, default),
        metavar="DIR",
        help=f"{what} (default: ${env} or ./{default})",
    )
