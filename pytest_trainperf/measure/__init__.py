"""One module per kind of measurement; each imports torch inside its functions or on import of the module.

Nothing outside ``fixture.py`` imports this package at plugin load.
"""
