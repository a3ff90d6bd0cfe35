"""Tracking thaw slumps through time: per-date polygon maps of a site become slump histories
(persistent ids, the relation of every link between consecutive dates, growth per interval).
See docs/tracking.md; `python -m rts_thaw.track` runs it."""
