"""The ``hybridrag`` command line."""
