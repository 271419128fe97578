"""Pipeline: takes a run config; gives a run directory, stage by stage (rank, latency, elastic, routers,
joint, evaluate, dynamic), each resumable and recorded with its wall time, tokens and summary.
"""
