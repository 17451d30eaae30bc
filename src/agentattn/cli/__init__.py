"""The ``agentattn`` command line."""
