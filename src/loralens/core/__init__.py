"""The foundation every other part stands on: errors, the typed study config and its
loading, the run directory (:class:`~loralens.core.run_dir.RunDir` names every file of a run),
atomic file writes, the job queue, timing, secret redaction, leftovers of killed runs and the
protocol differences. Imports nothing else of loralens.
"""
