"""Developer tools beside the library (not imported by the pipeline): benchmarks of the models.

Installed with sge_repro (pyproject's packages.find) so that `sge-repro bench` works.
"""
