"""Sweep configs, shipped as ``rts_thaw.sweeps`` and on Hydra's search path.

``sweep/<name>.yaml`` is selected with ``python -m rts_thaw.train -m +sweep=<name>``.
"""
