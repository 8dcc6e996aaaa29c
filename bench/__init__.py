"""The benchmark harness (`make bench`): see bench/harness.py. Not part of the test suite."""
