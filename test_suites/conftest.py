"""Shared test configuration: lab fixtures come from the jhlab pytest plugin
(``harness.pytest_plugin``, registered through the ``pytest11`` entry point)."""
