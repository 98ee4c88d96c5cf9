"""Benchmarks: the service end to end against the raw SDK and rclone, on one Azurite.

``make bench`` (or ``python -m benchmarks`` inside ``scripts/in-loopback-netns``) runs them
and rewrites ``benchmarks/RESULTS.md``, ``benchmarks/results.json`` and
``benchmarks/results.png``; ``--quick`` runs small workloads once, into ``benchmarks/work/``.
"""
