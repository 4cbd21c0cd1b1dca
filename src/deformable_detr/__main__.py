"""``python -m deformable_detr``: the deformable-detr command."""

from .cli import main

raise SystemExit(main())
