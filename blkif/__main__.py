from blkif.cli import main

raise SystemExit(main())
