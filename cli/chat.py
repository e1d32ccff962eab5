"""`meshchat chat`: the terminal chat app, on this machine's device profile."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import logging.handlers
from pathlib import Path
from typing import Final

import typer

from cli.chatapp import ChatApp
from cli.client import AsUserOption, BrokerOption
from cli.common import DEFAULT_DATA, DataOption, console, fail
from meshchat.client import Client, open_profile
from meshchat.errors import MeshchatError

__all__ = ["chat"]

LOG_FILE: Final = "chat.log"
"""Warnings while the app runs go here, in the profile's directory, not over the screen."""


def chat(
    as_user: AsUserOption = None,
    broker: BrokerOption = None,
    data: DataOption = DEFAULT_DATA,
) -> None:
    """Chat in all your groups: unread counts, history, search, urgent notices (F1: help).

    Works offline too: what you send is queued and goes out when the link returns.
    """
    try:
        profile = open_profile(data, as_user)
    except MeshchatError as exc:
        fail(str(exc))

    async def work() -> None:
        async with contextlib.AsyncExitStack() as stack:
            with console.status(f"Connecting to {broker or profile.broker} as {profile.user}…"):
                client = await stack.enter_async_context(Client(profile, broker=broker))
            await ChatApp(client).run_async()

    _log_to(profile.path / LOG_FILE)
    try:
        asyncio.run(work())
    except MeshchatError as exc:
        fail(str(exc))
    except KeyboardInterrupt:
        raise typer.Exit(130) from None


def _log_to(path: Path) -> None:
    """Send warnings to a small file: a full-screen app has no room for log lines."""
    handler = logging.handlers.RotatingFileHandler(
        path, maxBytes=1_000_000, backupCount=1, encoding="utf-8"
    )
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.WARNING, handlers=[handler], force=True)
