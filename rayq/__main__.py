from rayq.cli import main

raise SystemExit(main())
