"""docs/cli.md, the command reference, rendered from the click commands themselves.

In: the ``logitcache`` command group. Out: a title and every command's ``--help`` as
Markdown, alphabetically (``logitcache reference > docs/cli.md`` writes the file; a test keeps
it in step).
"""

from __future__ import annotations

import click

__all__ = ["render_reference"]

_TITLE = """\
# Command reference

Every command's `--help`, generated from the commands themselves by `logitcache reference >
docs/cli.md` (tests/test_demo.py fails when this file is stale). The README shows the
commands at work; docs/guide.md says what their flags do and why.

"""


def render_reference(main: click.Group) -> str:
    """docs/cli.md: a title, then every command's --help, in order."""
    parts = []
    for path in _command_paths(main, ["logitcache"]):
        ctx = click.Context(
            path[-1][1],
            info_name=path[-1][0],
            terminal_width=100,
            max_content_width=100,
            help_option_names=["-h", "--help"],
        )
        name = " ".join(p[0] for p in path)
        text = path[-1][1].get_help(ctx).replace(f"Usage: {path[-1][0]}", f"Usage: {name}", 1)
        parts.append(f"### `{name}`\n\n```\n{text}\n```\n")
    return _TITLE + "\n".join(parts)


def _command_paths(command: click.Command, prefix: list[str], trail=()) -> list:
    trail = (*trail, (prefix[-1], command))
    out = [list(trail)] if trail[1:] else []
    if isinstance(command, click.Group):
        for name in sorted(command.commands):
            sub = command.commands[name]
            if not sub.hidden:
                out += _command_paths(sub, [*prefix, name], trail)
    return out
