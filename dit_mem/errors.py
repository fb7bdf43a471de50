"""The one exception type for bad input.

``UserError`` is what every front door (the command line, the web page, evaluation, training)
shows as one line: a config, a file, a folder, an option or a call argument that does not fit.
It is a ``ValueError``, so Python callers that catch ``ValueError`` keep working. Anything else
raised inside dit-mem is a bug and keeps its traceback.
"""

from __future__ import annotations


class UserError(ValueError):
    """Bad input, with a message that names what is wrong and how to fix it."""
