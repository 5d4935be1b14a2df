"""``logitcache bench``: measure this machine and your caches (numbers, not tests).

The studies behind the defaults are not here: they are scripts in the repository's
``benchmarks/`` (not installed). docs/benchmarks.md records the numbers of both."""
