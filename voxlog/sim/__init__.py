"""Stand-ins for the outside world that the offline demo and the benchmarks talk to: a caller
that behaves as Twilio does towards the gateway, and a local server for Twilio's REST API."""
