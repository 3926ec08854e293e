"""`tunelab prompt render`: the exact messages a prompt spec produces (registered by tunelab/cli.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from tunelab.console import console, fail


def register(app: typer.Typer) -> None:
    prompt_app = typer.Typer(help="Inspect prompt specs.", no_args_is_help=True)
    prompt_app.command("render")(prompt_render)
    app.add_typer(prompt_app, name="prompt")


def prompt_render(
    spec: Path = typer.Argument(..., help="Prompt spec YAML."),
    input: Optional[str] = typer.Option(None, "--input", "-i", help="Input text (the `text` field)."),
    item: Optional[str] = typer.Option(None, "--item", help="A JSON object of dataset fields."),
    model: Optional[str] = typer.Option(None, "--model", "-m",
                                        help="Also show the exact text after the model's chat template."),
    as_json: bool = typer.Option(False, "--json", help="Print the messages as JSON."),
) -> None:
    """Show the exact messages a spec produces for one input."""
    from tunelab.prompts import load_prompt_spec

    s = load_prompt_spec(spec)
    if item is not None:
        try:
            fields = json.loads(item)
        except json.JSONDecodeError as e:
            fail(f"--item: invalid JSON ({e.msg}); expected an object like '{{\"text\": \"...\"}}'")
        if not isinstance(fields, dict):
            fail("--item: expected a JSON object")
    else:
        fields = {"text": input if input is not None else "", "question": input if input is not None else ""}
    messages = s.render(fields)
    if as_json:
        console.print_json(json.dumps(messages, ensure_ascii=False))
    else:
        for m in messages:
            console.rule(f"[bold]{m['role']}")
            console.print(m["content"], highlight=False, markup=False)
        console.rule()
    if model is not None:
        from tunelab.models import load_model

        mdl = load_model(model)
        if hasattr(mdl, "render"):
            console.rule("[bold]as the model sees it")
            console.print(mdl.render(messages), highlight=False, markup=False)
            console.print(f"({mdl.count_tokens(messages)} tokens)")
