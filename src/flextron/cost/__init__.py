"""Cost stage: takes an elastic model and this machine; gives the latency lookup table (METHOD §5).
Timing primitives (``timing``), the table itself (``table``) and its measurement and validation (``measure``).
"""
