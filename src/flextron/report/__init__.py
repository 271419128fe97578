"""Report stage: takes results (``results.json``, ``dynamic_results.json``) and training metrics; gives
Markdown tables and PNG plots (``report.md``, ``dynamic_report.md``).
"""
