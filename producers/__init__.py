"""The write side of the log: producers for each backend and the event writer on top of them."""
