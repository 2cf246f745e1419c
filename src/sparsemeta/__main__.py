from sparsemeta.cli import main

raise SystemExit(main())
