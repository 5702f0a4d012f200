"""A small scheduler speaking ``scheduler.v2``: the embedded default for one machine, tests and demos."""
