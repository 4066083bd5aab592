"""`python -m orchestrator.cli ...`: the `moe-orch` script."""

from orchestrator.cli import main

main()
