"""The applications' entry points: the mains of ``tools/*.py`` and the ``beit3-*`` console scripts, and the start-up
checks they run before any work; the library never imports this package."""
