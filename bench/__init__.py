"""`make bench`: side-by-side speed, accuracy and memory of the engines and the HTTP service.

`python -m bench.run` runs every section in `bench.run.SECTIONS` and writes `bench/results.md`.
"""
