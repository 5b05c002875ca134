from appliance.system.cli import main

raise SystemExit(main())
