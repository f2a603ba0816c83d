"""Tasks as data: the task spec and its registry (:mod:`.spec`), task files and the
built-in YAML (:mod:`.task_file`, ``builtin/``), row sources (GLUE files, local tables, the
hub: :mod:`.sources`, :mod:`.rows`) and the input preprocessing users import
(:mod:`.preprocess`). May import :mod:`loralens.core` only.
"""
