"""Trained models leaving loralens: standard artifacts with model cards
(:mod:`.writer`), predictions from a run or an artifact (:mod:`.predict`) and their CLI
arguments (:mod:`.commands`). May import analysis and everything below it.
"""
