"""The study: the one stage table (:mod:`.stages`), the executors that run its
units of work (local, job queue, Ray: :mod:`.executors`), the dry-run plan (:mod:`.plan`) and
study-level tracking (:mod:`.tracking`). May import every part below it.
"""
