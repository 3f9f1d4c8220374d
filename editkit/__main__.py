from editkit.cli import main

raise SystemExit(main())
