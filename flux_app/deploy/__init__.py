"""Deployment runtime pieces that run beside Flower's own processes on a site (no app code)."""
