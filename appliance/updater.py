"""Compatibility name: `python -m appliance.updater` runs `appliance.system.update.cli`.

Installed units, the role and the docs use this name; keep it while any may.
"""

# restructure: compatibility shim
import sys

from appliance.system.update.cli import main

if __name__ == "__main__":
    sys.exit(main())
