"""Routing stage: takes an elastic model and its lookup table; gives routers (static and dynamic) that
map a latency target (and an input) to a sub-network, the surrogate, deployment fitting and their files.
"""
