"""Browser tests of web-demo/ (a package, so its conftest does not shadow tests/integration/conftest.py)."""
