"""The weights stage: intruder dimensions and weight-change spectra
(:mod:`.measures`), forgetting of general text (:mod:`.forgetting`), the intruder sweep
(:mod:`.intruder_sweep`), per-method tables (:mod:`.methods`) and the stage (:mod:`.stage`).
"""
