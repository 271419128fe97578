"""Evaluation stage: takes a finished run; gives measurements (perplexity with bootstrap intervals,
timed latency, decode speed, downstream tasks through lm-eval, dynamic-routing comparisons) and deployment helpers.
"""
