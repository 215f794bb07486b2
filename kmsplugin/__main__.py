"""``python -m kmsplugin`` runs the plugin, like ``keyward plugin serve``."""

from __future__ import annotations

import sys

from kmsplugin import main

if __name__ == "__main__":
    sys.exit(main.main())
