"""Chain-of-thought annotation with a teacher (``mmrad annotate`` /
``python -m ray_jobs.annotate``): MMR-AD's data construction as a job.

- ``config``: :class:`~mmrad.annotate.config.AnnotateJobConfig`.
- ``job``: select records, run the evaluation's batch inference with hinted inputs
  (:mod:`mmrad.eval.inference`), judge every sample (:mod:`mmrad.eval.consistency`), write
  a new manifest beside the rejected samples and the acceptance counts.
- ``report``: the run's ``report.md`` and figures.

It builds on evaluation (inference, endpoint client, consistency checks, hints);
evaluation never imports it.

Importing this package imports neither Ray nor vLLM.
"""
