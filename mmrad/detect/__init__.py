"""Inspecting a folder (or ``s3://`` prefix) of new images (``mmrad detect`` /
``python -m ray_jobs.detect``).

- ``config``: :class:`~mmrad.detect.config.DetectJobConfig`, built from evaluation's
  sections (target, sampling, prompt, engine, predictors).
- ``inputs``: the files, their categories and each category's reference; every input
  error is raised there, before Ray starts.
- ``job``: evaluation's batch inference over the files (:mod:`mmrad.eval.inference`),
  then ``results`` (verdict, decision, overlay) on Ray Data.
- ``results`` / ``overlays`` / ``tables`` / ``sheet``: detection rows, overlay PNGs,
  ``detections.parquet`` and ``.csv``, the ``index.html`` contact sheet.

It builds on evaluation (inference, endpoint client, error budget) and on Serve's pure
pieces (``decide``, ``draw_boxes``); neither imports it.

Importing this package imports neither Ray nor vLLM.
"""
