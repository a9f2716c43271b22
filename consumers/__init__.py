"""The read side of the log: consumers for each backend, the event consumer, workers."""
