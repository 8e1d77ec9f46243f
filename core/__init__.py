"""The protocol core, pure (no I/O): what every other package of the project may import.

It imports nothing else of the project (``[tool.importlinter]`` in pyproject.toml checks this).
"""
