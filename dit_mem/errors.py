"""The one exception type for bad input.

``UserError`` is what every front door (the command line, the web page, evaluation, training)
shows as one line: a config, a file, a folder, an option or a call argument that does not fit.
It is a ``ValueError``, so Python callers that catch ``ValueError`` keep working. Anything else
raised inside dit-mem is a bug and keeps its traceback.
"""

from __future__ import annotations


class UserError(ValueError):
    """Bad input, with a message that names what is wrong and how to fix it."""


def user_errors() -> tuple[type[BaseException], ...]:
    """What every front door shows as one line: ``UserError``; ``OSError`` (missing, unreadable
    or wrongly laid out files and folders: diffusers and transformers raise it for model
    folders); ``SafetensorError`` (a damaged weights file). Anything else is a bug."""
    from safetensors import SafetensorError

    return (UserError, OSError, SafetensorError)
