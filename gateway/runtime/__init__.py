"""What every process shares: settings, lifecycle, health server, logs and metrics."""
