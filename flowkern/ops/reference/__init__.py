"""PyTorch references: one per op, used by tests, as the CPU fallback and as the eager benchmark provider."""
