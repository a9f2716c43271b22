"""Stand-ins for the outside world that the offline demo, the benchmarks and the tests talk to: a
caller that behaves as Twilio does towards the gateway, a page that behaves as the widget's script
does, and a local server for Twilio's REST API."""
