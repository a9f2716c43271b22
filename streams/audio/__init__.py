"""Audio on the hot path: G.711 mu-law, resampling, WAV streams (`codecs`), and voice activity (`vad`)."""
