"""Metrics (L6): ground-truth references and distances for the toy (math.md section 10)."""
