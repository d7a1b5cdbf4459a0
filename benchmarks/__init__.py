"""Performance harnesses that print ratios (run each as `python -m benchmarks.<name>`)."""
