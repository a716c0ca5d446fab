"""Platform-specific tuning: the one place that knows how each backend runs the model's products."""
