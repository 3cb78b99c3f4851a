"""Generated bone-marrow aspirate smears with known truth (``wsiflow synth``, ``wsiflow demo``)."""

from __future__ import annotations

from wsiflow.synth.cells import CLASS_CODES
from wsiflow.synth.layout import SynthParams
from wsiflow.synth.slide import SyntheticSlide, SynthResult, synthesize, truth_paths

__all__ = ["CLASS_CODES", "SynthParams", "SynthResult", "SyntheticSlide", "synthesize", "truth_paths"]
