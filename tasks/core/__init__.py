"""The difyops engine: inventory, validation, rendering, hosts, plans, apply, health gates.

Nothing here defines an Invoke task; the modules in tasks/ are thin wrappers around this package.
It imports nothing else of tasks/: no tier, no backup module, no task module
(tests/unit/test_layering.py).
"""
