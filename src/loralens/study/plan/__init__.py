"""The dry run: each stage's work counted from the config and the data
(:mod:`.work`), throughput measured in this process (:mod:`.measure`), the plan printed
(:mod:`.dry_run`).
"""
