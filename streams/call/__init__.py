"""The call: the pure core (`core.decide`), the session that runs one call on the hot path, what a channel
offers a session (`transport`), and replay (`replay.verify_call`)."""
