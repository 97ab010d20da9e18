"""`python -m prefixtune ...` (also what `accelerate launch -m prefixtune train ...` runs)."""

from .cli import main

raise SystemExit(main())
