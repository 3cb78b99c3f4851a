"""Slides: open with :func:`open_slide`, read RGB at a µm/px with :meth:`Slide.read`.

Two backends behind one :class:`Slide` (OpenSlide first, then TiffSlide; a run prefers
:data:`RUN_READER`, TiffSlide, in planning and in its workers alike; URLs go to TiffSlide).
Every backend failure, at open or at read, is a :class:`~wsiflow.errors.SlideError`.
"""

from wsiflow.slide._base import MPP_MAX, RUN_READER, Slide, open_slide

__all__ = ["MPP_MAX", "RUN_READER", "Slide", "open_slide"]
