"""Benchmarks of the gateway beside the Python peers a user would pick instead.

Run as ``python -m bench --help``. Every scenario starts real server processes
on loopback, drives them with one raw WebSocket/HTTP client, reads the servers'
CPU time and resident memory from /proc, prints a table and writes JSON.
"""
