from clipalign.cli import main

raise SystemExit(main())
