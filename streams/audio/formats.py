"""The audio formats voxlog works in, defined once: what sessions, channels and audio chunk events carry."""

FRAME_MS = 20
"""One media frame: what a channel delivers at a time (an audio chunk event gathers several:
`streams.audio.chunking`)."""
PCM_RATE = 16_000
"""Sessions work in 16 kHz mono signed 16-bit little-endian PCM; channels convert at the edges."""
MULAW_RATE = 8_000
"""The phone's rate: G.711 mu-law, what Twilio's media streams and SIP trunks carry."""
PCM_BYTES_PER_MS = PCM_RATE * 2 // 1000  # 32
PCM_FRAME_BYTES = PCM_BYTES_PER_MS * FRAME_MS  # 640
MULAW_FRAME_BYTES = MULAW_RATE * FRAME_MS // 1000  # 160
