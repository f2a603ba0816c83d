"""The serving benchmark stage (``loralens bench``): per-task latency
(:mod:`.task`), several adapters at once (:mod:`.multi`), float64 identity checks
(:mod:`.identity`), timing (:mod:`.measure`), result files (:mod:`.results`) and the stage
(:mod:`.stage`).
"""
