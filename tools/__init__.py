"""Command-line tools: record_trace.py (trace distributions for synthetic data), plot_metrics.py (curves)."""
