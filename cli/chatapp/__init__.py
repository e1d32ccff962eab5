"""The terminal chat app behind `meshchat chat` (Textual)."""

from cli.chatapp.app import KEYS, ChatApp
from cli.chatapp.commands import COMMANDS, Command, CommandError, parse
from cli.chatapp.view import ChatView

__all__ = ["COMMANDS", "KEYS", "ChatApp", "ChatView", "Command", "CommandError", "parse"]
