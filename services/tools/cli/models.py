"""Asking the deployed champions: predict, generate."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from services.tools.cli.common import (
    EXIT_USAGE,
    CliError,
    app,
    settings,
)


@app.command()
def predict(
    rows: Annotated[str, typer.Argument(help="A JSON object or list of objects (raw columns).")],
    model: Annotated[str | None, typer.Option("--model", help="Model name; default: the only one.")] = None,
    url: Annotated[
        str | None, typer.Option(help="Inference URL; default: the one `cairn up` serves.")
    ] = None,
) -> None:
    """Ask the inference endpoint for predictions and print them."""
    from services.tools.client import Client, EndpointError

    try:
        json.loads(rows)
    except json.JSONDecodeError as exc:
        raise CliError(f"the rows are not JSON ({exc.msg} at character {exc.pos})", EXIT_USAGE) from None
    try:
        typer.echo(json.dumps(Client(settings(None)).predict(rows, model, url), indent=2))
    except EndpointError as exc:
        raise CliError(str(exc)) from None


@app.command()
def generate(
    prompt: Annotated[str, typer.Argument(help="Text to continue.")],
    model: Annotated[
        str | None, typer.Option("--model", help="Model name; default: the only text model.")
    ] = None,
    max_tokens: Annotated[int, typer.Option(help="Tokens to generate.")] = 64,
    temperature: Annotated[float, typer.Option(help="0 is greedy.")] = 0.8,
    top_k: Annotated[int | None, typer.Option(help="Sample from the k most likely tokens.")] = 40,
    seed: Annotated[int, typer.Option(help="Sampling seed: the same seed gives the same text.")] = 0,
    url: Annotated[
        str | None, typer.Option(help="Inference URL; default: the one `cairn up` serves.")
    ] = None,
) -> None:
    """Continue a prompt with a deployed text model."""
    from services.tools.client import Client, EndpointError

    sampling = {"max_tokens": max_tokens, "temperature": temperature, "top_k": top_k, "seed": seed}
    try:
        typer.echo(prompt + Client(settings(None)).generate(prompt, model, url, **sampling))
    except EndpointError as exc:
        raise CliError(str(exc)) from None
