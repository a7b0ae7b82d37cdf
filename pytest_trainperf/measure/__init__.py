"""One module per kind of measurement. Those that need torch import it inside their functions or
on their own import; nothing outside ``fixture.py`` imports them at plugin load (``host``, which
needs no torch, is the exception: the plugin fixes the allocator before tests are imported).
"""
