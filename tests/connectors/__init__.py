"""Local servers that speak each vendor's API, and the harnesses the connector contract suites drive."""
