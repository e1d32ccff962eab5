"""The `meshchat` command line: Typer commands that parse, call the library and print."""

from cli.main import app, main

__all__ = ["app", "main"]
