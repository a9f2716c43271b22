"""The channels callers reach a call by: each carrier's protocol, pure or as a client of its API, apart
from the transports that carry it (those are the gateway's: `gateway/`)."""
