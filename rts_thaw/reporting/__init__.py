"""Turns a finished sweep directory into tables and plots (`python -m rts_thaw.report`)."""
