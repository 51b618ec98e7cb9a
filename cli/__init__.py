"""The ``mtk`` command line: thin click commands over the ``toolkit`` Python API."""
