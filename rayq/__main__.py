from rayq.launch.cli import main

raise SystemExit(main())
