"""Training: batches (:mod:`.batches`), the one training loop for every method
(:mod:`.loop`), one training job (:mod:`.job`), precision, devices, FLOP counts,
classification metrics, experiment tracking, sanity checks and the Optuna search.
May import :mod:`loralens.models`, :mod:`loralens.tasks` and :mod:`loralens.core`.
"""
