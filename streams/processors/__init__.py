"""Stream processors: pure folds of events into state and messages (the interface, and the live call
registry); their runtimes, in-process and faust, are in `consumers`."""
