"""The application layer: the only code that knows every pass (CLI, runner, recipes, demo, publish, inspect)."""
