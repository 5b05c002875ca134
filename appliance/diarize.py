"""Compatibility name: `python -m appliance.diarize fetch DATA_DIR` (the speaker model fetch,
as the previous release documented it) runs `appliance.core.diarize`."""

# restructure: compatibility shim
import sys

from appliance.core.diarize import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
