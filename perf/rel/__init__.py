"""The reliability suite's parts (perf/reliability.py runs them)."""
