"""The ground every other package stands on: atomic I/O and hashing, user errors, failpoints.

Nothing here imports a project package (the import-linter contract in pyproject.toml checks it),
and nothing here imports torch at module level.
"""
