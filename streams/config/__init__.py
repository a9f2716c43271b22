"""What operators define: agents (prompts, tools, guardrails, voices, routing), tenants (API keys, dialling,
limits), and what changed since it was last recorded."""
