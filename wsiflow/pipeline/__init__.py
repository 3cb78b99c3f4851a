"""The pipeline layer: what happens to one slide, independent of where it runs (DESIGN §1, §4).

* :mod:`wsiflow.pipeline.plan` — on the client: open the slide, require a trustworthy
  µm/px, build the tile grid, keep the stained tiles, record the slide's identity;
* :mod:`wsiflow.pipeline.batch` — in a task: a loaded slide + loaded models + tiles → the
  cells those tiles own (:func:`~wsiflow.pipeline.batch.process_batch`);
* :mod:`wsiflow.pipeline.finish` — on the client, once the tiles are in the cell store: the
  summary, QuPath GeoJSON, optional GeoParquet, ``summary.json``, the ``summary.csv`` row
  and the HTML report.

Where the work runs (Dask, caches per worker process, retries, resume) is the
:mod:`wsiflow.execution` layer above; the submodules are imported explicitly.
"""
