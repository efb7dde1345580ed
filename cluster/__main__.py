"""``python -m cluster``: the iommu-emu command line (cluster/cli.py)."""

from __future__ import annotations

from cluster.cli import main

raise SystemExit(main())
