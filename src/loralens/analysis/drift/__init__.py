"""The drift stage: per-layer similarity of each model to the base model
(:mod:`.measures`), its statistics (:mod:`.stats`) and the stage itself with its tables
(:mod:`.stage`), every method vs the reference in a study of more methods included.
"""
