"""Training: batches (:mod:`.batches`), the one training loop for every method
(:mod:`.loop`), the one training step it takes (:mod:`.step`: also what the dry run
times), one training job (:mod:`.job`), precision, devices, FLOP counts,
classification metrics, experiment tracking, sanity checks and the Optuna search.
May import :mod:`loralens.models`, :mod:`loralens.tasks` and :mod:`loralens.core`.
"""
