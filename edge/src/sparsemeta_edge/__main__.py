"""``python -m sparsemeta_edge`` = the ``sparsemeta-edge`` command."""

from sparsemeta_edge.cli import main

raise SystemExit(main())
