"""The call: the pure core (`core.decide`, `core.outcome`); the session that runs one call on the hot
path, as the activity (`session.CallSession`) tying recognition (`recognition`) and speech out
(`speech_out`) to the core through the call's inputs (`inputs`); what a channel offers a session and
plays (`transport`); and replay (`replay.verify_call`)."""
