"""The drift stage: per-layer similarity of each model to the base model
(:mod:`.measures`), its statistics and tables (:mod:`.stats`, :mod:`.methods`) and the stage
itself (:mod:`.stage`).
"""
