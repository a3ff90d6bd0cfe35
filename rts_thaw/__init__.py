"""rts_thaw: multimodal instance segmentation of Arctic retrogressive thaw slumps."""

__version__ = "0.1.0"
