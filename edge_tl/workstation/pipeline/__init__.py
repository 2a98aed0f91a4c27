"""``edge-tl build``: the stages (train, prune, export, quantize, bundle, report) over one run folder.

:func:`edge_tl.workstation.pipeline.run.run_build` runs them; :mod:`.stages` holds one function per stage,
:mod:`.cache` the content-addressed stage cache, :mod:`.context` what the stages share.
"""
