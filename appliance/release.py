"""Compatibility name: `python -m appliance.release` runs `appliance.system.update.release`.

Installed units, the role and the docs use this name; keep it while any may.
"""

# restructure: compatibility shim
import sys

from appliance.system.update.release import load_public_key, main

__all__ = ["load_public_key", "main"]

if __name__ == "__main__":
    sys.exit(main())
