"""Programs that use the client, each run by tests/test_examples.py."""
