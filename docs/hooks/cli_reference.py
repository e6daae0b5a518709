"""MkDocs hook: the CLI reference page is generated from the typer application itself, so
it cannot drift from `defectscope --help`. (mkdocs-click cannot read it: typer vendors
its own click, whose parameters are not click's.)"""

from __future__ import annotations

import typer

MARKER = "<!-- cli-reference -->"


def _cell(text: object) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def _command_markdown(name: str, command: typer.core.TyperCommand) -> str:
    ctx = command.make_context(f"defectscope {name}", [], resilient_parsing=True)
    lines = [f"## {name}", "", (command.help or "").strip(), "", "```text", command.get_usage(ctx), "```", ""]
    rows = []
    for param in command.params:
        if getattr(param, "hidden", False):
            continue
        names = ", ".join(f"`{o}`" for o in [*param.opts, *getattr(param, "secondary_opts", [])])
        kind = "argument" if param.param_type_name == "argument" else "option"
        default = "" if param.default in (None, ()) or param.required else f"`{param.default}`"
        rows.append(f"| {names} | {kind} | {_cell(getattr(param, 'help', None) or '')} | {default} |")
    if rows:
        lines += ["| name | kind | what | default |", "|---|---|---|---|", *rows, ""]
    return "\n".join(lines)


def on_page_markdown(markdown: str, page, config, files) -> str:  # noqa: ANN001 - MkDocs' hook signature
    if MARKER not in markdown:
        return markdown
    from defectscope.cli import app

    group = typer.main.get_command(app)
    parts = [_command_markdown(name, cmd) for name, cmd in sorted(group.commands.items())]
    return markdown.replace(MARKER, "\n".join(parts))
