"""The toy world: tiny *trained* models of the real Wan stack, and a concept only memory knows.

Clips are 9×32×32: one coloured shape (6 colours × 3 shapes × 4 directions) moving on a dark
background, captioned "a red circle moving left". The recipe (``dit-mem toyworld train``)
trains a Wan VAE, then a Wan DiT + UMT5 text encoder that never see the held-out colour
(magenta), builds a memory bank that does contain it, and trains our memory encoder with
``dit-mem train``. The metrics read colour, shape and direction back out of generated videos,
so the effect of memory is a number: see ``benchmarks/toyworld.md``.

Modules: ``world`` (clips, captions), ``metrics``, ``vae`` / ``base`` / ``bank`` / ``memory``
(the stages), ``evaluate`` (the metric table), ``recipe`` (all stages + export).
"""

from dit_mem.toyworld.metrics import accuracy, read_concept
from dit_mem.toyworld.world import HELD_OUT, Clip, caption, concepts, parse_caption, render

__all__ = [
    "HELD_OUT",
    "Clip",
    "accuracy",
    "caption",
    "concepts",
    "parse_caption",
    "read_concept",
    "render",
]
