"""WebRTC's voice activity detector as a `SpeechJudge` (the `webrtcvad-wheels` package: Google's C code).

Each 10 ms piece of a frame is classified by a Gaussian mixture over six sub-band energies whose
noise model adapts to the line, so steady noise (hiss, hum, a fan, road rumble) is not speech however
loud it is, where a level threshold hears any sound. Two detectors run side by side for hysteresis: an
aggressive one (`start_mode`) must hear a frame for it to start speech, a lenient one (`keep_mode`)
keeps it going. About 2.5 us a 20 ms frame each (docs/performance.md, `voxlog bench vad`).
"""

from __future__ import annotations

import webrtcvad

RATES = (8000, 16_000, 32_000, 48_000)
PIECE_MS = 10


class WebRtcJudge:
    """`start_mode` and `keep_mode`: WebRTC's aggressiveness, 0 (hears most as speech) to 3 (least)."""

    def __init__(self, *, start_mode: int = 3, keep_mode: int = 2, sample_rate: int = 16_000) -> None:
        if sample_rate not in RATES:
            raise ValueError(f"WebRTC's VAD takes {', '.join(map(str, RATES))} Hz, not {sample_rate}")
        if not (0 <= keep_mode <= start_mode <= 3):
            raise ValueError("modes are 0 to 3, and the start mode at least the keep mode")
        self._starter = webrtcvad.Vad(start_mode)
        self._keeper = self._starter if keep_mode == start_mode else webrtcvad.Vad(keep_mode)
        self._rate = sample_rate
        self._piece = 2 * sample_rate * PIECE_MS // 1000  # bytes
        self._last = (False, False)

    def judge(self, frame: bytes) -> tuple[bool, bool]:
        if len(frame) in (self._piece, 2 * self._piece, 3 * self._piece):  # 10, 20 or 30 ms: WebRTC's own sizes
            pieces = [frame]
        else:  # any other size in 10 ms pieces, a frame passing where half of them do; less than 10 ms: as the last
            pieces = [frame[i:i + self._piece] for i in range(0, len(frame) - self._piece + 1, self._piece)]
            if not pieces:
                return self._last
        starts = self._hears(self._starter, pieces)
        # Each detector hears every piece: its noise model adapts to the line as it goes.
        keeps = starts if self._keeper is self._starter else self._hears(self._keeper, pieces)
        self._last = (starts, keeps or starts)
        return self._last

    def _hears(self, detector: webrtcvad.Vad, pieces: list[bytes]) -> bool:
        """Whether `detector` hears speech in half the pieces or more."""
        return sum(bool(detector.is_speech(piece, self._rate)) for piece in pieces) * 2 >= len(pieces)
