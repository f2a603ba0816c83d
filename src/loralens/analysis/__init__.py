"""Analysis of trained models: hidden-state extraction (:mod:`.extract`),
similarity measures (:mod:`.similarity`), statistics (:mod:`.stats`), representation drift
(:mod:`.drift`), weight space and forgetting (:mod:`.weights`) and load-test latency
summaries (:mod:`.latency`). May import training and everything below it.
"""
