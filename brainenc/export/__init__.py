"""Files for others to read: benchmark submissions written from a trained run."""
