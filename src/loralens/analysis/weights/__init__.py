"""The weights stage: intruder dimensions and weight-change spectra
(:mod:`.measures`), forgetting of general text (:mod:`.forgetting`), the intruder sweep
(:mod:`.intruder_sweep`), the per-model analysis and the summaries, every method vs the
reference included (:mod:`.analyzer`), and the stage (:mod:`.stage`).
"""
