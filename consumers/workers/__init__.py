"""The side-effect workers: tools, the dialer, the summariser, the gateways' leases and reaper."""
