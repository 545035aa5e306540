"""The pieces behind `python -m cpool.bench`: cases, workloads, the per-module worker and the report.

Nothing here is imported by `import cpool`; the cases take the module under test (cpool, the
standard library's multiprocessing, or a context of either) as an argument, so the same code
measures both.
"""
