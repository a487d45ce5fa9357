"""Benchmarks behind `shira bench`: adapter switching, one decode step, training cost and a live server.

Each module measures its peers side by side in one process (or in interleaved rounds) and returns the
figures as a dict, with a function that formats them as text; the `shira bench` commands only parse flags
and print. Lives apart from shira_core because the serving benchmark drives the service.
"""
