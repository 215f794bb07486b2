"""The ``keyward`` command: key administration (``keys``), the plugin (``plugin``) and helpers."""
