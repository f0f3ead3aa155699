"""The commands: one module per `lmdistill` command (its `run_*` entry point) and the reports of the studies.

Library modules never import these (tests/test_imports.py); `lmdistill.cli` calls them from its command table.
"""
