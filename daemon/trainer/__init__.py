"""The trainer process (one per rank): validates, trains, checkpoints and publishes one job. Imports torch."""
