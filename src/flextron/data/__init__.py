"""Data stage: takes a config; gives the embedded assets (verified and cached), text corpora and the
token blocks of a run (calibration, training, router, held-out, out-of-domain, per-domain sets).
"""
