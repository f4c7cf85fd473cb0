"""The `swajax` command line: the dispatch (`entry`, `commands`), one module per
command (`train`, `generate`) and the benchmarks (`bench`).

The top wing: it may import every other; nothing imports it."""
